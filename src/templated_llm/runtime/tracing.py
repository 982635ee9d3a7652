"""MLflow traces of requests: one span per ``predict`` (``CHAT_MODEL`` for conversations, ``LLM``
for prompts) with the params, the template's name and version and the token usage in MLflow's
standard attribute, and a child span for templating and one for generation.

Traced when the logged model allows it and MLflow tracing is enabled (its default): turned off
with ``log_llm(..., tracing=False)`` or ``TEMPLATED_LLM_TRACING=false`` where the model is
served. ``trace_content=False`` (or ``TEMPLATED_LLM_TRACE_CONTENT=false``) keeps prompt and
completion text, and template variables' values, out of the traces: only counts remain.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import LiveSpan, SpanEvent, SpanStatusCode, SpanType
from mlflow.environment_variables import MLFLOW_TRACE_SAMPLING_RATIO
from mlflow.tracing.constant import SpanAttributeKey, TokenUsageKey

from templated_llm.runtime.completions import CANCELLED, Completion
from templated_llm.runtime.inputs import Row
from templated_llm.runtime.params import GenerationParams
from templated_llm.runtime.streams import Stream

_logger = logging.getLogger(__name__)

TRACING_ENV = "TEMPLATED_LLM_TRACING"
TRACE_CONTENT_ENV = "TEMPLATED_LLM_TRACE_CONTENT"
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
# Tracking URIs whose traces this process writes itself (a file, or a database through SQLAlchemy).
_SELF_WRITTEN_STORES = frozenset({"", "file", "sqlite", "postgresql", "mysql", "mssql"})
# Attribute keys of our own, beside MLflow's standard ones.
_MODEL, _TEMPLATE, _TEMPLATE_VERSION, _PARAMS, _TASK = (
    f"templated_llm.{key}" for key in ("model", "template", "template_version", "params", "task"))


def setting(env: str, logged: bool) -> bool:
    """The logged switch, unless the environment variable ``env`` overrides it."""
    value = os.environ.get(env)
    if value is None:
        return logged
    if value.strip().lower() not in _BOOLEANS:
        raise ValueError(f"environment variable {env}={value!r}: expected one of {sorted(_BOOLEANS)}")
    return _BOOLEANS[value.strip().lower()]


class Tracer:
    """Starts the trace of each request for one loaded model."""

    def __init__(self, *, enabled: bool, content: bool, model: str, template: str,
                 template_version: str, task: str | None, prompt: tuple[str, str] | None = None) -> None:
        self.enabled = setting(TRACING_ENV, enabled)
        self.content = setting(TRACE_CONTENT_ENV, content)
        self._attributes = {_MODEL: model, _TEMPLATE: template, _TEMPLATE_VERSION: template_version}
        if task:
            self._attributes[_TASK] = task
        if prompt is not None:
            # The prompt registry version the template came from, as MLflow records one.
            name, version = prompt
            self._attributes[SpanAttributeKey.LINKED_PROMPTS] = json.dumps([{"name": name, "version": version}])
        self._name = model

    def cost_warning(self) -> str | None:
        """What tracing every request costs a server that writes the traces into a store itself
        (a file or a database, not a tracking server), and what to do about it; ``None`` where
        it does not."""
        from mlflow.tracing.provider import is_tracing_enabled

        if not self.enabled or not is_tracing_enabled():
            return None
        sampling = None
        with contextlib.suppress(ValueError):  # MLflow itself reports a malformed value
            sampling = MLFLOW_TRACE_SAMPLING_RATIO.get()
        uri = mlflow.get_tracking_uri()
        if (sampling is not None and sampling < 1) or urllib.parse.urlparse(uri).scheme not in _SELF_WRITTEN_STORES:
            return None
        return (f"every request is traced into {uri}: this process writes each trace, in MLflow's "
                f"background threads, with tens of milliseconds of CPU per request taken from "
                f"generation (about 90 ms with SQLite on a 2-core machine). At high request rates, "
                f"trace to a tracking server, trace a share of the requests "
                f"({MLFLOW_TRACE_SAMPLING_RATIO.name}=0.1), or turn tracing off ({TRACING_ENV}=false)")

    @contextlib.contextmanager
    def request(self) -> Iterator[RequestTrace]:
        """The trace of one request; inert when tracing is off here or in MLflow."""
        if not self.enabled:
            yield RequestTrace(None, self.content)
            return
        with span(self._name, SpanType.LLM, self._attributes, content=self.content) as live:
            yield RequestTrace(live, self.content)


    def stream(self, rows: list[Row], generation: GenerationParams, variables: dict[str, str],
               chunks: Iterator[str | Completion]) -> Iterator[str | Completion]:
        """A stream's chunks (its text, then its :class:`Completion`) traced as one request span
        that ends with the stream: a span started apart from the caller's context (under the
        caller's current span, if any), as the stream is read piece by piece."""
        if not self.enabled:
            return chunks
        span = mlflow.start_span_no_context(self._name, SpanType.LLM, attributes=self._attributes,
                                            parent_span=mlflow.get_current_active_span())
        if not isinstance(span, LiveSpan):  # MLflow's tracing is disabled
            return chunks
        trace = RequestTrace(span, self.content)
        trace.rows(rows)
        trace.params(generation, variables)

        def closed_unread() -> None:
            chunks.close()
            span.end(status="ERROR")
        return Stream(_traced_stream(trace, span, chunks), closed_unread, cancel=getattr(chunks, "cancel", None))


@contextlib.contextmanager
def span(name: str, span_type: str, attributes: dict[str, Any] | None = None, *,
         content: bool) -> Iterator[LiveSpan | None]:
    """``mlflow.start_span``, the live span or None (MLflow's tracing disabled). Without
    ``content``, an exception raised in it is recorded by type and error code only: its message
    may quote the input (a 400 names the value received). The caller gets it as it is."""
    withheld = None
    with mlflow.start_span(name, span_type, attributes) as started:
        live = started if isinstance(started, LiveSpan) else None
        try:
            yield live
        except Exception as exc:
            if live is None or content:
                raise  # MLflow records it, message and stack trace
            _record_error(live, exc)
            withheld = exc
    if withheld is not None:
        raise withheld


def _record_error(span: LiveSpan, exc: BaseException) -> None:
    """Mark ``span`` failed with ``exc``'s type and error code, not its message."""
    code = getattr(exc, "error_code", None)
    span.add_event(SpanEvent("exception", attributes={
        "exception.type": type(exc).__name__,
        "exception.message": f"withheld (trace content is off){f'; {code}' if code else ''}"}))
    span.set_status(SpanStatusCode.ERROR)


def _traced_stream(trace: RequestTrace, span: LiveSpan, chunks: Iterator[str | Completion]
                   ) -> Iterator[str | Completion]:
    status = "ERROR"  # unless the stream reaches its Completion: failed, or closed early
    try:
        with contextlib.closing(chunks):  # closing this closes them, which stops the generation
            for chunk in chunks:
                if isinstance(chunk, Completion):
                    trace.response({"text": chunk.text, "finish_reason": chunk.finish_reason}, [chunk])
                    status = "ERROR" if chunk.finish_reason == CANCELLED else "OK"
                yield chunk
    finally:
        span.end(status=status)


def _usage(completions: Sequence[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(c.completion_tokens for c in completions)
    return {TokenUsageKey.INPUT_TOKENS: prompt, TokenUsageKey.OUTPUT_TOKENS: generated,
            TokenUsageKey.TOTAL_TOKENS: prompt + generated}


def _encodable(value: Any) -> Any:
    """``value`` with each lone surrogate in its strings written as its escape (``\\udcff``). A
    request refused for holding one is traced with what it sent, and MLflow cannot export a trace
    holding one (UTF-8 has no encoding for it): the trace was lost, with a traceback in the log."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encodable(v) for v in value]
    return value


class RequestTrace:
    """What ``predict`` records on its trace; every method does nothing when ``span`` is None."""

    def __init__(self, span: Any | None, content: bool) -> None:
        self._span = span
        self._content = content
        self._params: list[dict[str, Any]] = []  # one per request of a task model's call

    def rows(self, rows: list[Row], fields: dict[str, Any] | None = None) -> None:
        """The request's rows (and, for a task model, its body's other ``fields``)."""
        if self._span is None:
            return
        chat = any(not isinstance(row, str) for row in rows)
        if chat:
            self._span.set_span_type(SpanType.CHAT_MODEL)
        # One conversation as {"messages": [...]}: the shape MLflow's trace view shows as a chat.
        shown = {"messages": rows[0]} if chat and len(rows) == 1 else {
            "conversations" if chat else "prompts": rows}
        self._span.set_inputs(self._shown({**shown, **(fields or {})}, {"rows": len(rows)}))

    @contextlib.contextmanager
    def body_if_refused(self, model_input: Any, chat: bool) -> Iterator[None]:
        """Records ``model_input`` as the request's inputs when the block (reading its rows)
        raises: a refused request's trace shows what it was sent."""
        try:
            yield
        except Exception:
            self.body(model_input, chat)
            raise

    def body(self, model_input: Any, chat: bool) -> None:
        """A request refused before its rows were read: its body as received."""
        if self._span is None:
            return
        if chat:
            self._span.set_span_type(SpanType.CHAT_MODEL)
        try:
            if isinstance(model_input, pd.DataFrame):
                # Escaped first: pandas cannot write a lone surrogate as JSON either.
                model_input = json.loads(model_input.map(_encodable).to_json(orient="records"))
            self._span.set_inputs(self._shown({"body": model_input}, {"body": "<not traced>"}))
        except Exception:  # the caller is raising the request's refusal: that must reach the client
            _logger.warning("could not record a refused request's body on its trace", exc_info=True)

    def params(self, generation: GenerationParams, variables: dict[str, str],
               row_tokens: list[int] | None = None) -> None:
        """The params a request generates with; ``row_tokens``: each row's ``max_tokens``, listed
        where rows were given different ones (an omitted ``max_tokens`` fitted to each prompt)."""
        if self._span is None:
            return
        values = generation.model_dump(mode="json", by_alias=True, exclude_none=True)
        if row_tokens is not None and len(set(row_tokens)) > 1:
            values["max_tokens"] = row_tokens
        # Template variables carry the user's text: without content, only their names.
        values.update(self._shown(variables, dict.fromkeys(variables, "<not traced>")))
        # A task model's call of several requests generates each with its own params: a list.
        self._params.append(values)
        self._span.set_attribute(_PARAMS, values if len(self._params) == 1 else self._params)

    @contextlib.contextmanager
    def rendering(self, rows: list[Row]) -> Iterator[_Stage]:
        """The templating stage: rows to the text the model sees."""
        with self._stage("render_prompts", SpanType.CHAIN, self._shown({"rows": rows}, {"rows": len(rows)})) as stage:
            yield stage

    @contextlib.contextmanager
    def generation(self, input_ids: list[list[int]]) -> Iterator[_Stage]:
        """The generation stage (with the wait for a batch to join)."""
        with self._stage("generate", SpanType.LLM, {"prompt_tokens": [len(i) for i in input_ids]}) as stage:
            yield stage

    def response(self, response: Any, completions: Sequence[Completion]) -> None:
        if self._span is None:
            return
        if isinstance(response, pd.DataFrame):
            response = response.to_dict("records")
        self._span.set_attribute(SpanAttributeKey.CHAT_USAGE, _usage(completions))
        self._span.set_outputs(self._shown(response, {"finish_reasons": [c.finish_reason for c in completions]}))

    def _shown(self, value: Any, without_content: Any) -> Any:
        return _encodable(value) if self._content else without_content

    @contextlib.contextmanager
    def _stage(self, name: str, span_type: str, inputs: dict[str, Any]) -> Iterator[_Stage]:
        if self._span is None:
            yield _Stage(None, self._shown)
            return
        with mlflow.start_span(name, span_type) as span:
            span.set_inputs(inputs)
            yield _Stage(span, self._shown)


class _Stage:
    def __init__(self, span: Any | None, shown: Callable[[Any, Any], Any]) -> None:
        self._span = span
        self._shown = shown

    def rendered(self, prompts: list[str]) -> None:
        if self._span is not None:
            self._span.set_outputs(self._shown({"prompts": prompts}, {"characters": [len(p) for p in prompts]}))

    def generated(self, completions: Sequence[Completion]) -> None:
        if self._span is None:
            return
        self._span.set_attribute(SpanAttributeKey.CHAT_USAGE, _usage(completions))
        self._span.set_outputs([
            {"finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens,
             **self._shown({"text": c.text}, {})}
            for c in completions
        ])
