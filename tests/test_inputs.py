from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from templated_llm.inputs import to_prompts


@pytest.mark.parametrize(
    "model_input",
    [
        pd.DataFrame({"prompt": ["a", "b"]}),
        ["a", "b"],
        {"prompt": ["a", "b"]},
        pd.Series(["a", "b"]),
        np.array(["a", "b"]),
        pd.DataFrame({"0": ["a", "b"]}),
        {"prompt": np.array(["a", "b"])},
    ],
)
def test_accepted_shapes(model_input) -> None:
    assert to_prompts(model_input) == ["a", "b"]


def test_a_single_string() -> None:
    assert to_prompts("a") == ["a"]
    assert to_prompts({"prompt": "a"}) == ["a"]


@pytest.mark.parametrize(
    ("model_input", "message"),
    [
        (pd.DataFrame({"text": ["a"]}), "'prompt' column; received columns \\['text'\\]"),
        ({"text": ["a"]}, "'prompt' key"),
        ([], "no prompts"),
        (pd.DataFrame({"prompt": []}), "no prompts"),
        (["a", None], "row 1 must be a string; received null"),
        (pd.DataFrame({"prompt": ["a", None]}), "row 1 must be a string; received null"),
        ({"prompt": ["a", 3]}, "row 1 must be a string; received 3"),
        (42, "received int"),
        ({"prompt": np.array([["x"]])}, "row 0 must be a string"),
    ],
)
def test_bad_input_is_an_invalid_parameter_error(model_input, message) -> None:
    with pytest.raises(MlflowException, match=message) as caught:
        to_prompts(model_input)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_a_dict_of_lists_that_mlflow_packed_into_one_row() -> None:
    assert to_prompts(pd.DataFrame({"prompt": [["a", "b"]]})) == ["a", "b"]
