"""The inputs stage: what ``predict`` receives, as prompt strings or chat conversations (rows),
or a clear 400 saying why not."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode

PROMPT_COLUMN = "prompt"
MESSAGES_COLUMN = "messages"
#: A chat turn, as OpenAI's API takes it: ``{"role": "user", "content": "..."}``.
Message = dict[str, str]
ROLES = ("system", "user", "assistant")
#: A request row: a prompt string, or an OpenAI-style list of chat messages.
Row = str | list[Message]
# JSON's "\udXXX" escapes can carry lone surrogates, which no tokenizer can encode.
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def openai_role(role: Any) -> Any:
    """A role as this model takes it: OpenAI's ``developer`` is the ``system`` one."""
    return "system" if role == "developer" else role


def system_prompt_twice(row: Row, variables: Mapping[str, Any], defaults: Mapping[str, str],
                        variable: str) -> str | None:
    """Why a request is refused that sets the system prompt both as a system message of ``row``
    and as the ``system`` template variable (``variable``: how the request names it); ``None``
    where it does not. Neither would win silently: the caller raises its own 400 with this.

    A ``system`` equal to the template's default is not counted as set: MLflow fills every param
    a request leaves out with its default, so on any route only another value is known to be sent.
    """
    if isinstance(row, str) or variables.get("system", defaults.get("system")) == defaults.get("system"):
        return None
    if not any(m["role"] == "system" for m in row):
        return None
    return f"the request sets the system prompt twice, as a system message and as {variable}; send one"


def read_rows(model_input: Any, max_rows: int, first_row: int = 0) -> list[Row]:
    """The rows of a request: its prompts, or its conversations when it sends ``messages``.

    Raises ``MlflowException`` (HTTP 400 when served) for malformed input, more than
    ``max_rows`` rows (the limit logged with the model), or text that is not valid Unicode.
    ``first_row``: the number a refusal gives the first row (its place in the caller's request).
    """
    rows = (to_conversations(model_input, first_row) if has_messages(model_input)
            else to_prompts(model_input, first_row))
    check_row_limit(len(rows), max_rows)
    for row, value in enumerate(rows, first_row):
        texts = [value] if isinstance(value, str) else [m["content"] for m in value]
        if found := next(filter(None, map(_LONE_SURROGATE.search, texts)), None):
            raise MlflowException.invalid_parameter_value(
                f"prompt at row {row} is not valid Unicode: it holds the lone surrogate "
                f"{found.group()!r} at character {found.start()}; send UTF-8 text"
            )
    return rows


def read_requests(model_input: Any, param_names: Collection[str], max_rows: int, first_row: int = 0
                  ) -> list[tuple[list[Row], dict[str, Any]]]:
    """The requests in ``model_input``, each its rows and its own params: one request, or, for a
    DataFrame with columns named as params (``max_tokens``, ``temperature``, a template
    variable...), one per DataFrame row, with that row's values (an empty cell sets nothing).

    A DataFrame column that is neither the prompts, the messages nor a param is refused rather
    than ignored: a setting sent under a wrong name would otherwise change nothing, silently.
    Refusals number each request's rows from ``first_row``.
    """
    if isinstance(model_input, list) and model_input and all(
            isinstance(r, dict) and (PROMPT_COLUMN in r or MESSAGES_COLUMN in r) for r in model_input):
        model_input = pd.DataFrame(model_input)  # records, as MLflow's scoring server reads them
    fields = model_input.columns if isinstance(model_input, pd.DataFrame) else \
        model_input if isinstance(model_input, dict) else ()
    if PROMPT_COLUMN in fields and MESSAGES_COLUMN in fields:
        raise MlflowException.invalid_parameter_value(
            f"the input holds both {PROMPT_COLUMN!r} and {MESSAGES_COLUMN!r}; send one of them: prompts "
            "to template, or conversations for a chat model")
    if not isinstance(model_input, pd.DataFrame):
        return [(read_rows(model_input, max_rows, first_row), {})]
    main = MESSAGES_COLUMN if has_messages(model_input) else PROMPT_COLUMN
    others = [str(c) for c in model_input.columns if str(c) != main]
    # "0": a positional column, read as the prompts; without its prompts, read_rows says so.
    if not others or others == ["0"] or main not in model_input.columns:
        return [(read_rows(model_input, max_rows, first_row), {})]
    refuse_unknown(others, param_names, "columns")
    check_row_limit(len(model_input), max_rows)
    frame = model_input.set_axis([str(c) for c in model_input.columns], axis=1)
    requests = []
    for index in range(len(frame)):
        with request_at(index, len(frame)):
            rows = read_rows(frame[[main]].iloc[[index]], max_rows, first_row)
        params = {name: value for name in others if (value := cell_value(frame[name].iloc[index])) is not None}
        requests.append((rows, params))
    check_row_limit(sum(len(rows) for rows, _ in requests), max_rows)
    return requests


def refuse_unknown(found: Collection[str], param_names: Collection[str], what: str) -> None:
    """Refuse the input ``what`` (fields, columns) in ``found`` that are not params: a setting
    sent under a wrong name would otherwise change nothing, silently."""
    unknown = sorted(set(found) - set(param_names))
    if unknown:
        raise MlflowException.invalid_parameter_value(
            f"input {what} {unknown} are neither {PROMPT_COLUMN!r}, {MESSAGES_COLUMN!r} nor a param "
            f"of this model; params are {sorted(param_names)}")


def cell_value(value: Any) -> Any:
    """A DataFrame cell as a plain Python value; ``None`` for a cell the request left empty."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


@contextlib.contextmanager
def request_at(index: int, count: int) -> Iterator[None]:
    """Names, in a 400 raised inside, the request of a frame of ``count`` that it is about (its
    own message names the row or field within that request)."""
    try:
        yield
    except MlflowException as exc:
        if count == 1 or exc.get_http_status_code() != 400:
            raise
        # error_code holds the code's name; the constructor takes its number.
        raise MlflowException(f"request {index} (of {count} in the frame): {exc.message}",
                              error_code=ErrorCode.Value(exc.error_code)) from exc


def check_row_limit(rows: int, max_rows: int) -> None:
    """Refuse a request of more than ``max_rows`` rows (the limit logged with the model)."""
    if rows > max_rows:
        raise MlflowException.invalid_parameter_value(
            f"the request has {rows} prompts; this model accepts at most {max_rows} per "
            "request (max_rows_per_request, set when it was logged). Split the request."
        )


def _rows(value: Any) -> list[Any]:
    """A value as rows: a sequence as its items, anything else (a string, a 0-d array MLflow
    makes of a JSON scalar or object, ...) as one row, which ``to_prompts`` then checks."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, list | tuple | pd.Series | np.ndarray):
        return list(value)
    return [value]


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
        return _rows(model_input[PROMPT_COLUMN])
    if isinstance(model_input, str | list | tuple | pd.Series | np.ndarray):
        return _rows(model_input)
    raise MlflowException.invalid_parameter_value(
        "input must be a DataFrame with a 'prompt' column, a list of strings or a dict of lists; "
        f"received {type(model_input).__name__}"
    )


def to_prompts(model_input: Any, first_row: int = 0) -> list[str]:
    prompts = _column(model_input)
    if not prompts:
        raise MlflowException.invalid_parameter_value("input has no prompts; send at least one")
    for row, prompt in enumerate(prompts, first_row):
        if not isinstance(prompt, str):
            received = "null" if pd.isna(prompt) is True else f"{prompt!r} ({type(prompt).__name__})"
            raise MlflowException.invalid_parameter_value(
                f"prompt at row {row} must be a string; received {received}"
            )
    return prompts


def has_messages(model_input: Any) -> bool:
    """Whether the input is chat ``messages`` rather than prompts."""
    if isinstance(model_input, pd.DataFrame):
        return MESSAGES_COLUMN in model_input.columns
    if isinstance(model_input, list) and model_input:
        return all(isinstance(r, dict) and MESSAGES_COLUMN in r for r in model_input)
    return isinstance(model_input, dict) and MESSAGES_COLUMN in model_input


def _plain(value: Any) -> Any:
    # pandas and Spark hand nested values over as numpy arrays; JSON as lists.
    if isinstance(value, np.ndarray | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _conversations(value: Any) -> list[Any]:
    """One conversation (a list of message dicts) or a list of them, as a list of them."""
    value = _plain(value)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [value]
    return value if isinstance(value, list) else [value]


def to_conversations(model_input: Any, first_row: int = 0) -> list[list[Message]]:
    """The ``messages`` of every row: each a list of ``{"role", "content"}`` dicts.

    Accepted: a DataFrame with a ``messages`` column (a conversation per row, or, as MLflow
    turns ``{"inputs": {"messages": [...]}}`` into, one row holding them all), a list of
    ``{"messages": ...}`` records, or a dict with a ``messages`` key holding one conversation or
    a list of them. OpenAI's `developer` role is the `system` one. Refusals number the rows from
    ``first_row``.
    """
    if isinstance(model_input, pd.DataFrame):
        values = _plain(model_input[MESSAGES_COLUMN].tolist())
        if len(values) == 1:
            values = _conversations(values[0])
    elif isinstance(model_input, list):
        values = [_plain(record[MESSAGES_COLUMN]) for record in model_input]
    else:
        values = _conversations(model_input[MESSAGES_COLUMN])
    if not values:
        raise MlflowException.invalid_parameter_value("input has no messages; send at least one conversation")
    values = [_with_openai_roles(conversation) for conversation in values]
    for row, conversation in enumerate(values, first_row):
        _check_conversation(row, conversation)
    return values


def _with_openai_roles(conversation: Any) -> Any:
    """``conversation`` with each message's role read by :func:`openai_role`; anything that is
    not a list of messages as it is, for the check to refuse."""
    if not isinstance(conversation, list):
        return conversation
    return [{**m, "role": openai_role(m["role"])} if isinstance(m, dict) and "role" in m else m
            for m in conversation]


def _check_conversation(row: int, conversation: Any) -> None:
    def bad(problem: str) -> MlflowException:
        return MlflowException.invalid_parameter_value(
            f"messages at row {row}: {problem}. Send a list of {{'role', 'content'}} dicts, "
            "an optional 'system' first, then 'user' and 'assistant' turns in turn, ending "
            "with 'user'"
        )

    if not isinstance(conversation, list) or not conversation:
        raise bad(f"expected a non-empty list of messages; received {conversation!r}")
    for index, message in enumerate(conversation):
        if isinstance(message, dict) and {"role", "content"} < set(message):
            extra = sorted(str(k) for k in set(message) - {"role", "content"})
            raise bad(f"message {index} has fields {extra} that this model does not support "
                      "(no tool calls or other message fields); send only 'role' and 'content'")
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise bad(f"message {index} must be a dict with keys 'role' and 'content'; received {message!r}")
        if message["role"] not in ROLES:
            raise bad(f"message {index} has role {message['role']!r}; allowed roles: {list(ROLES)}")
        if not isinstance(message["content"], str):
            raise bad(f"message {index} content must be a string; received {message['content']!r}")
    turns = conversation[1:] if conversation[0]["role"] == "system" else conversation
    expected = ["user", "assistant"] * len(turns)
    roles = [m["role"] for m in turns]
    if roles != expected[: len(roles)] or not roles or roles[-1] != "user":
        raise bad(f"the roles are {[m['role'] for m in conversation]}")
