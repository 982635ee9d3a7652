"""``predict_fn``: a logged TemplatedLLM as the ``predict_fn`` of ``mlflow.genai.evaluate``.

``mlflow.genai.evaluate(data, scorers, predict_fn=predict_fn(model_uri))`` calls it once per
row with the row's ``inputs`` as keywords, from many threads at once: the loaded model is
shared, and its batcher merges the concurrent calls into batches. Each call is a trace: a span
for the call (the row's inputs, the answer) over the model's own (see ``runtime/tracing.py``),
so the scorers and the evaluation's results see each row's trace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlflow
from mlflow.entities import SpanType
from mlflow.pyfunc import PyFuncModel

from templated_llm.runtime.inputs import Message
from templated_llm.runtime.tasks import COMPLETIONS
from templated_llm.runtime.tracing import span


def predict_fn(model: str | PyFuncModel, params: dict[str, Any] | None = None) -> Callable[..., str]:
    """A thread-safe function of one evaluation row's inputs that returns the model's answer.

    ``model`` is a model URI (loaded once, here) or a loaded model; ``params`` (``temperature``,
    ``max_tokens``, ``response_format``, ...) apply to every row. The function takes
    ``prompt=`` (a string) or ``messages=`` (OpenAI-style chat turns), and any template
    variables (``system=``, ...) as further keywords, and returns the completion's text.
    Whatever task the model was logged with, the call and the answer are the same.
    """
    loaded = mlflow.pyfunc.load_model(model) if isinstance(model, str) else model
    task = (loaded.metadata.metadata or {}).get("task")
    schema = loaded.metadata.get_params_schema()
    in_schema = {spec.name for spec in schema.params} if schema else set()
    # A task model's request body fields too; MLflow would drop any other name with a warning,
    # and the evaluation would run with other settings than asked.
    inputs = loaded.metadata.get_input_schema()
    allowed = in_schema | ({*inputs.input_names()} - {"prompt", "messages"} if task and inputs else set())

    def check(names: Any, what: str) -> None:
        if unknown := sorted(set(names) - allowed):
            raise TypeError(f"{what} {unknown} are not params of this model; it takes {sorted(allowed)}")

    fixed = dict(params or {})
    check(fixed, "params")

    def predict(prompt: str | None = None, messages: list[Message] | None = None, **variables: str) -> str:
        if (prompt is None) == (messages is None):
            given = "both" if prompt is not None else "neither"
            raise TypeError(f"pass the row's text as prompt=... or its chat turns as messages=... (one of "
                            f"them); received {given}")
        check(variables, "the row's inputs")
        request = {**fixed, **variables}
        if task is None:  # the 'prompt'/'candidates' schema
            frame = loaded.predict({"messages": [messages]} if messages is not None else [prompt],
                                   params=request)
            return frame["candidates"][0]
        # A task model reads the request body's fields from the input, the rest as params.
        body = {key: value for key, value in request.items() if key not in in_schema}
        request = {key: value for key, value in request.items() if key in in_schema}
        if task == COMPLETIONS:
            if messages is not None:
                raise TypeError(f"a model logged with task {COMPLETIONS!r} takes prompt=..., not messages")
            return loaded.predict({"prompt": prompt, **body}, params=request)["choices"][0]["text"]
        turns = messages if messages is not None else [{"role": "user", "content": prompt}]
        return loaded.predict({"messages": turns, **body}, params=request)["choices"][0]["message"]["content"]

    tracer = getattr(loaded.unwrap_python_model(), "tracer", None)
    if tracer is not None and not tracer.enabled:  # the model's tracing switch holds here too
        return predict
    content = tracer is None or tracer.content

    def traced(**row: Any) -> str:
        # The row's trace starts at this call, with the row's inputs as passed and the answer
        # (the model's own span, with its token usage, below it): what the evaluation's results
        # show per row. Without content, only the inputs' names and the answer's length.
        with span("predict_fn", SpanType.CHAIN, content=content) as live:
            if live is not None:
                live.set_inputs(row if content else {"inputs": sorted(row)})
            answer = predict(**row)
            if live is not None:
                live.set_outputs(answer if content else {"characters": len(answer)})
            return answer

    return traced
