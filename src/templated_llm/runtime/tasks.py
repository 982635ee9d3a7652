"""MLflow's LLM task schemas, ``llm/v1/chat`` and ``llm/v1/completions``: a model logged with one
takes OpenAI-shaped request bodies (one request per input row, its sampling params in the row)
and answers each with one OpenAI-shaped response object, usage and finish reason included."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.llm import (
    CHAT_MODEL_INPUT_SCHEMA,
    CHAT_MODEL_OUTPUT_SCHEMA,
    COMPLETIONS_MODEL_INPUT_SCHEMA,
    COMPLETIONS_MODEL_OUTPUT_SCHEMA,
    ChatChoice,
    ChatCompletionResponse,
    ChatMessage,
    TokenUsageStats,
)
from mlflow.types.schema import ParamSchema

from templated_llm.errors import TaskError
from templated_llm.runtime.completions import Completion
from templated_llm.runtime.inputs import (
    MESSAGES_COLUMN,
    PROMPT_COLUMN,
    Row,
    cell_value,
    check_row_limit,
    read_rows,
    request_at,
)

CHAT = "llm/v1/chat"
COMPLETIONS = "llm/v1/completions"
Task = Literal["llm/v1/chat", "llm/v1/completions"]
TASKS: tuple[str, ...] = (CHAT, COMPLETIONS)

_SIGNATURES = {
    CHAT: (CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA),
    COMPLETIONS: (COMPLETIONS_MODEL_INPUT_SCHEMA, COMPLETIONS_MODEL_OUTPUT_SCHEMA),
}
_INPUT_COLUMN = {CHAT: MESSAGES_COLUMN, COMPLETIONS: PROMPT_COLUMN}
# Fields of MLflow's request schemas this model does not implement: a request that sets one
# to anything but its neutral value is refused rather than silently served without it.
_NEUTRAL = {"n": 1, "stream": False, "frequency_penalty": 0.0, "presence_penalty": 0.0,
            "tools": None, "custom_inputs": None}
#: Params a task model answers with regardless: its response always carries usage.
TASK_PARAMS_NOT_IN_SCHEMA = ("return_usage",)
#: An input example for each task, saved with the logged model.
INPUT_EXAMPLES: dict[str, dict[str, Any]] = {
    CHAT: {"messages": [{"role": "user", "content": "What is machine learning?"}], "max_tokens": 16},
    COMPLETIONS: {"prompt": "What is machine learning?", "max_tokens": 16},
}


def check_task(task: str | None, chat: bool, model: str) -> None:
    """Refuse a task MLflow does not define, or the chat task for a model that takes no chat."""
    if task is not None and task not in TASKS:
        raise TaskError(
            f"task {task!r} is not one this model can be logged with; choose one of {list(TASKS)} "
            "or None (the default 'prompt'/'candidates' schema)"
        )
    if task == CHAT and not chat:
        raise TaskError(
            f"model {model!r} does not take chat messages, so it cannot be logged with task "
            f"{CHAT!r}; log it with task {COMPLETIONS!r} instead"
        )


def task_signature(task: str, params: ParamSchema) -> ModelSignature:
    """MLflow's own input and output schemas for ``task``, with the params the input schema
    does not already carry (``params`` filtered to those)."""
    inputs, outputs = _SIGNATURES[task]
    in_body = set(inputs.input_names()) | set(TASK_PARAMS_NOT_IN_SCHEMA)
    return ModelSignature(
        inputs=inputs, outputs=outputs,
        params=ParamSchema([p for p in params.params if p.name not in in_body]),
    )


@dataclass(frozen=True)
class TaskRequest:
    """One request of a task model: its conversation or prompts (a completions body's
    ``prompt`` may be a list, answered with a choice each), and the params its body set."""

    rows: list[Row]
    params: dict[str, Any]


# Message fields that, empty, say nothing (the openai client sends them back with a message).
_EMPTY_CHANGES_NOTHING = ("tool_calls", "annotations")


def read_task_requests(model_input: Any, task: str, max_rows: int, stream: bool = False) -> list[TaskRequest]:
    """The requests in ``model_input``: a DataFrame with one request body per row (what MLflow
    hands over after checking the body against the task's schema), or one body as a dict.
    ``stream``: for ``predict_stream``, where a body's ``"stream": true`` is what it asks for."""
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame([model_input])
    column = _INPUT_COLUMN[task]
    if column not in frame.columns:
        raise MlflowException.invalid_parameter_value(
            f"a model logged with task {task!r} takes request bodies with a {column!r} field; "
            f"received fields {[str(c) for c in frame.columns]}"
        )
    check_row_limit(len(frame), max_rows)
    if task == CHAT:
        frame = frame.assign(**{column: frame[column].map(_as_plain_messages)})
    # A chat request is one conversation: each row is read as a one-row input of its own.
    rows = []
    for index in range(len(frame)):
        with request_at(index, len(frame)):
            rows.append(read_rows(frame[[column]].iloc[[index]], max_rows))
    check_row_limit(sum(map(len, rows)), max_rows)
    requests = []
    for index, row in enumerate(rows):
        params = {str(k): v for k, v in ((k, cell_value(frame[k].iloc[index])) for k in frame.columns)
                  if k != column and v is not None}
        for name, neutral in _NEUTRAL.items():
            if params.pop(name, neutral) not in (neutral, None) and not (stream and name == "stream"):
                with request_at(index, len(frame)):
                    raise MlflowException.invalid_parameter_value(
                        f"request field {name!r} is not supported by this model; leave it out "
                        f"(or set it to {neutral!r})"
                    )
        requests.append(TaskRequest(row, params))
    return requests


def _as_plain_messages(messages: Any) -> Any:
    """An OpenAI chat body's messages as role and content, read as the OpenAI routes read them:
    the fields MLflow's chat schema allows and that change nothing here are dropped (``name``,
    fields left null, empty ``tool_calls``), and an assistant turn without content is its
    refusal, or empty. Anything else is left for the check to refuse (which reads the
    ``developer`` role as the ``system`` one, as for every input)."""
    if not isinstance(messages, (list, np.ndarray)):
        return messages
    plain = []
    for message in messages:
        if isinstance(message, dict):
            message = {k: v for k, v in message.items() if v is not None and k != "name"
                       and not (k in _EMPTY_CHANGES_NOTHING and isinstance(v, (list, np.ndarray)) and len(v) == 0)}
            if message.get("role") == "assistant":
                refusal = message.pop("refusal", "")
                message.setdefault("content", refusal)
        plain.append(message)
    return plain


def task_response(task: str, model: str, completions: list[Completion]) -> dict[str, Any]:
    """The OpenAI-shaped response to one request, a choice per completion (per prompt of a
    completions request): ``chat.completion`` or ``text_completion``."""
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(c.completion_tokens for c in completions)
    usage = TokenUsageStats(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)
    if task == CHAT:
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}", model=model, usage=usage,
            choices=[ChatChoice(index=i, message=ChatMessage(role="assistant", content=c.text),
                                finish_reason=c.finish_reason) for i, c in enumerate(completions)],
        ).to_dict()
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason}
                    for i, c in enumerate(completions)],
        "usage": usage.to_dict(),
    }
