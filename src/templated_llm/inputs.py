"""Turns what ``predict`` receives into a list of prompt strings, or says clearly why not."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

PROMPT_COLUMN = "prompt"


def _column(model_input: Any) -> list[Any]:
    if isinstance(model_input, pd.DataFrame):
        if [str(c) for c in model_input.columns] == ["0"]:
            # One positional column, as MLflow passes a column to spark_udf: the prompts.
            model_input = model_input.set_axis([PROMPT_COLUMN], axis=1)
        if PROMPT_COLUMN not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"input must have a {PROMPT_COLUMN!r} column; received columns "
                f"{[str(c) for c in model_input.columns]}"
            )
        values = model_input[PROMPT_COLUMN].tolist()
        # MLflow turns a dict of lists ({"prompt": [...]}) into one row holding the list.
        if len(values) == 1 and isinstance(values[0], list | tuple | np.ndarray):
            return list(values[0])
        return values
    if isinstance(model_input, dict):
        if PROMPT_COLUMN not in model_input:
            raise MlflowException.invalid_parameter_value(
                f"input must have a {PROMPT_COLUMN!r} key; received keys {list(model_input)}"
            )
        value = model_input[PROMPT_COLUMN]
        return [value] if isinstance(value, str) else list(value)
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, list | tuple | pd.Series | np.ndarray):
        return list(model_input)
    raise MlflowException.invalid_parameter_value(
        "input must be a DataFrame with a 'prompt' column, a list of strings or a dict of lists; "
        f"received {type(model_input).__name__}"
    )


def to_prompts(model_input: Any) -> list[str]:
    prompts = _column(model_input)
    if not prompts:
        raise MlflowException.invalid_parameter_value("input has no prompts; send at least one")
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            received = "null" if pd.isna(prompt) is True else f"{prompt!r} ({type(prompt).__name__})"
            raise MlflowException.invalid_parameter_value(
                f"prompt at row {row} must be a string; received {received}"
            )
    return prompts
