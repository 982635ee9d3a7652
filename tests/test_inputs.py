from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException

from templated_llm.runtime.inputs import has_messages, read_requests, to_conversations, to_prompts


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


PARAMS = ("max_tokens", "temperature", "stop")


def test_a_frame_with_param_columns_is_a_request_per_row() -> None:
    frame = pd.DataFrame({"prompt": ["a", "b", "c"], "max_tokens": [3, np.nan, 5],
                          "stop": [["x"], None, np.array(["y", "z"])]})
    assert read_requests(frame, PARAMS, 8) == [
        (["a"], {"max_tokens": 3, "stop": ["x"]}), (["b"], {}), (["c"], {"max_tokens": 5, "stop": ["y", "z"]})]
    # A row holding a list of prompts (as MLflow packs a dict of lists) is one request of them all.
    assert read_requests(pd.DataFrame({"prompt": [["a", "b"]], "temperature": [0.5]}), PARAMS, 8) == [
        (["a", "b"], {"temperature": 0.5})]
    for plain in (pd.DataFrame({"prompt": ["a", "b"]}), pd.DataFrame({"0": ["a", "b"]}), ["a", "b"]):
        assert read_requests(plain, PARAMS, 8) == [(["a", "b"], {})]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"prompt": ["a"], "temprature": [0.5]}), r"input columns \['temprature'\] are neither"),
        (pd.DataFrame({"text": ["a"], "max_tokens": [3]}), "'prompt' column; received columns"),
        (pd.DataFrame({"prompt": ["a", None], "max_tokens": [3, 3]}),
         r"request 1 \(of 2 in the frame\): prompt at row 0 must be a string"),
        (pd.DataFrame({"prompt": ["a", "b", "c"], "max_tokens": [1, 2, 3]}), "at most 2 per request"),
    ],
)
def test_a_frame_with_param_columns_refuses_what_it_cannot_read(frame, message) -> None:
    with pytest.raises(MlflowException, match=message):
        read_requests(frame, PARAMS, 2)


def test_prompt_records_read_as_mlflows_scoring_server_reads_them() -> None:
    assert read_requests([{"prompt": "a"}, {"prompt": "b", "max_tokens": 2}], PARAMS, 8) == [
        (["a"], {}), (["b"], {"max_tokens": 2})]
    assert read_requests([{"prompt": "a"}, {"prompt": "b"}], PARAMS, 8) == [(["a", "b"], {})]


CHAT = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("model_input", [
    {"prompt": ["x"], "messages": [CHAT]},
    pd.DataFrame({"prompt": ["x"], "messages": [CHAT]}),
    [{"prompt": "x"}, {"messages": CHAT}],
], ids=["dict", "frame", "records"])
def test_prompts_and_messages_together_are_refused(model_input) -> None:
    # The dict's prompts were dropped without a word: only its messages were answered.
    with pytest.raises(MlflowException, match="holds both 'prompt' and 'messages'; send one of them") as caught:
        read_requests(model_input, PARAMS, 8)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def _message(role: str):
    return st.builds(lambda content: {"role": role, "content": content}, st.text(max_size=20))


def _conversation():
    """A valid chat: an optional system message, then user/assistant turns ending with user."""
    turns = st.integers(0, 3).flatmap(
        lambda n: st.tuples(*[st.tuples(_message("user"), _message("assistant"))] * n, _message("user"))
    ).map(lambda t: [m for pair in t[:-1] for m in pair] + [t[-1]])
    return st.tuples(st.none() | _message("system"), turns).map(lambda s: ([s[0]] if s[0] else []) + s[1])


@settings(max_examples=50)
@given(st.lists(_conversation(), min_size=1, max_size=4))
def test_conversations_arrive_whole_in_every_input_shape(conversations) -> None:
    shapes = [
        {"messages": conversations},
        pd.DataFrame({"messages": conversations}),
        [{"messages": c} for c in conversations],
        # numpy, as MLflow's JSON parsing and Spark hand nested lists over
        pd.DataFrame({"messages": [np.array(c, dtype=object) for c in conversations]}),
    ]
    if len(conversations) == 1:
        shapes.append({"messages": conversations[0]})
    for shape in shapes:
        assert has_messages(shape)
        assert to_conversations(shape) == conversations


@pytest.mark.parametrize(
    ("conversation", "message"),
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"role": "user"}], "keys 'role' and 'content'"),
        ([{"role": "user", "content": "a", "name": "x"}], r"has fields \['name'\] that this model does not support"),
        ([{"role": "tool", "content": "a"}], "role 'tool'"),
        ([{"role": "user", "content": None}], "content must be a string"),
        ([{"role": "system", "content": "a"}], "roles are \\['system'\\]"),
        ([{"role": "assistant", "content": "a"}], "roles are \\['assistant'\\]"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "roles are"),
        ([{"role": "user", "content": "a"}] * 2, "roles are \\['user', 'user'\\]"),
    ],
)
def test_malformed_conversations_name_the_row_and_the_problem(conversation, message) -> None:
    with pytest.raises(MlflowException, match=message) as caught:
        to_conversations({"messages": [[{"role": "user", "content": "ok"}], conversation]})
    assert "messages at row 1" in str(caught.value)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_prompts_are_not_messages() -> None:
    assert not has_messages(["a"]) and not has_messages({"prompt": ["a"]})
    assert not has_messages(pd.DataFrame({"prompt": ["a"]}))


@pytest.mark.parametrize(
    "model_input",
    [np.array(5), {"prompt": {"nested": "object"}}, {"prompt": np.array({"a": 1}, dtype=object)}],
    ids=["0-d array", "dict as the prompt", "0-d object array as the prompt"],
)
def test_scalars_and_objects_where_prompts_belong_are_named_in_the_error(model_input):
    with pytest.raises(MlflowException, match="prompt at row 0 must be a string; received") as info:
        to_prompts(model_input)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
