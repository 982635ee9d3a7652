"""The ASGI app: OpenAI's routes under ``/v1``, ``/metrics``, and MLflow's scoring routes.

MLflow's own scoring app (``mlflow.pyfunc.scoring_server.init``, FastAPI) is mounted under
everything else once the model is loaded, so ``/invocations``, ``/ping``, ``/health`` and
``/version`` answer exactly as under ``mlflow models serve``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from templated_llm.errors import RequestError, user_message
from templated_llm.runtime.completions import Completion
from templated_llm.runtime.inputs import Row
from templated_llm.serving import openai_requests as oai
from templated_llm.serving.backend import LoadedModel, load
from templated_llm.serving.config import ServerConfig
from templated_llm.serving.failures import CLIENT_GONE, SHUTTING_DOWN, TIMEOUT, as_request_error
from templated_llm.serving.gate import RECORD, ASGIApp, Gate, Record
from templated_llm.serving.generations import ACCEPTED, FINISHED, Generations, InFlight
from templated_llm.serving.metrics import CONTENT_TYPE, Metrics
from templated_llm.serving.mlflow_routes import KeepRefusals
from templated_llm.serving.openai_responses import DONE, Reply, error_body, error_event

_logger = logging.getLogger("templated_llm.serving")
_V1_ROUTES = {"/v1/chat/completions": "POST", "/v1/completions": "POST", "/v1/models": "GET"}


class ServerState:
    """The loaded model (None while loading) and what the routes share."""

    def __init__(self, config: ServerConfig, on_load_failure: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.model: LoadedModel | None = None
        self.mlflow_app: ASGIApp | None = None
        self.draining = False
        self.load_error: BaseException | None = None
        self._on_load_failure = on_load_failure
        self.metrics = Metrics(lambda: self.model.backend.stats() if self.model else None)
        self.in_flight = InFlight(config.max_pending, self.metrics.sequences.set)
        self._active: set[Generations] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def available(self) -> str | None:
        """Why no request is taken now, or None."""
        if self.draining:
            return "the server is shutting down"
        if self.load_error is not None:
            return f"the model failed to load: {self.load_error}"
        return None if self.model is not None else "the model is loading; retry in a moment"

    def start_loading(self) -> None:
        self._loop = asyncio.get_running_loop()
        # MLflow's /invocations generates on the default executor: as many threads as sequences
        # the server takes, so concurrent requests reach the model (and batch) together.
        self._loop.set_default_executor(ThreadPoolExecutor(self.config.max_pending, "templated-llm-mlflow"))
        threading.Thread(target=self._load, name="templated-llm-load", daemon=True).start()

    def _load(self) -> None:
        from mlflow.pyfunc import scoring_server

        try:
            model = load(self.config.model_uri, self.config.served_model_name)
            mlflow_app = KeepRefusals(scoring_server.init(model.pyfunc))
        except Exception as exc:  # noqa: BLE001 - reported, and the server stops
            if (message := user_message(exc)) is not None:  # the user's to fix: no traceback
                _logger.error("loading %s failed: %s", self.config.model_uri, message)
            else:
                _logger.exception("loading %s failed", self.config.model_uri)
            self._loop.call_soon_threadsafe(self._failed, exc)
            return
        self._loop.call_soon_threadsafe(self._ready, model, mlflow_app)

    def _ready(self, model: LoadedModel, mlflow_app: ASGIApp) -> None:
        self.model, self.mlflow_app = model, mlflow_app
        _logger.info("serving %s as %r", self.config.model_uri, model.name)
        if warning := model.backend.tracing_warning():
            _logger.warning(warning)

    def _failed(self, exc: BaseException) -> None:
        self.load_error = exc
        self._on_load_failure()

    def request_drain(self) -> None:
        """Take no more requests; cancel those still running after the shutdown timeout.
        Safe to call from a signal handler."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self.draining = True
        self._loop.call_later(self.config.shutdown_timeout, self._cancel_all)

    def _cancel_all(self) -> None:
        for generations in list(self._active):
            generations.interrupt(SHUTTING_DOWN)

    def watch(self, generations: Generations) -> Callable[[], None]:
        """Time ``generations`` out, and cancel them at shutdown; returns the call that stops this."""
        timer = self._loop.call_later(self.config.request_timeout, generations.interrupt, TIMEOUT)
        self._active.add(generations)

        def unwatch() -> None:
            timer.cancel()
            self._active.discard(generations)
        return unwatch

    def wait_idle(self, timeout: float) -> bool:
        return self.in_flight.wait_idle(timeout)


def create_app(state: ServerState) -> ASGIApp:
    """The server's ASGI app for ``state``."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # MLflow's timeout is whole seconds, and 0 would time out every route (/ping too).
        os.environ.setdefault("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT",
                              str(max(1, math.ceil(state.config.request_timeout))))
        state.start_loading()
        yield
        # Cancelled sequences stop at their next token; wait for them to let go of the model.
        await asyncio.to_thread(state.wait_idle, 10.0)

    api = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @api.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> Response:
        return _error_response(exc)

    @api.get("/v1/models")
    async def models() -> Response:
        return _json_response({"object": "list", "data": [_model_card(state.model)]})

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        _check_model(state.model, model_id)
        return _json_response(_model_card(state.model))

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        parsed = oai.parse(oai.ChatRequest, await request.body())
        _check_model(state.model, parsed.model)
        spec = state.model.backend.spec
        row, variables = oai.chat_row(parsed, spec)
        return await _answer(state, request, parsed, [row], oai.params(parsed, spec, variables), chat=True)

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        parsed = oai.parse(oai.CompletionRequest, await request.body())
        _check_model(state.model, parsed.model)
        spec = state.model.backend.spec
        return await _answer(state, request, parsed, parsed.prompts, oai.params(parsed, spec), chat=False)

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @api.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def unknown(request: Request) -> Response:
        path, method = request.url.path, request.method
        if path in _V1_ROUTES:
            raise RequestError(f"{method} is not allowed on {path}; use {_V1_ROUTES[path]}", status=405,
                               code="method_not_allowed")
        raise RequestError(f"no route {method} {path}; this server has "
                           f"{[f'{m} {p}' for p, m in _V1_ROUTES.items()]}", status=404, code="unknown_url")

    async def mlflow_routes(scope: Any, receive: Any, send: Any) -> None:
        await state.mlflow_app(scope, receive, send)  # the gate lets nothing through before load

    api.mount("/", mlflow_routes)
    return Gate(api, state.metrics, api_key=state.config.api_key,
                max_body_bytes=state.config.max_body_bytes, available=state.available)


def _json_response(document: Any, status: int = 200) -> Response:
    return Response(json.dumps(document), status_code=status, media_type="application/json")


def _error_response(error: RequestError) -> Response:
    body = error_body(error.message, type=error.type, param=error.param, code=error.code)
    # At capacity or loading: clients (the openai SDK among them) wait this long to retry.
    headers = {"retry-after": "1"} if error.status in (429, 503) else None
    return Response(body, status_code=error.status, media_type="application/json", headers=headers)


def _model_card(model: LoadedModel) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": "templated-llm"}


def _check_model(model: LoadedModel, name: str) -> None:
    if name != model.name:
        raise RequestError(f"the model {name!r} does not exist; this server serves {model.name!r}",
                           status=404, param="model", code="model_not_found")


async def _answer(state: ServerState, request: Request, parsed: Any, rows: list[Row],
                  params: dict[str, Any], chat: bool) -> Response:
    """Generate ``parsed.n`` choices for every row, streamed or whole."""
    model, n = state.model, parsed.n
    count = len(rows) * n
    rows_field = "messages" if chat else "prompt"
    if n > state.config.max_n:
        raise RequestError(f"param 'n': at most {state.config.max_n} on this server (--max-n); received {n}",
                           param="n")
    if count > model.backend.max_rows:
        raise RequestError(
            f"the request asks for {count} choices ({len(rows)} prompts x n={n}); this model takes at "
            f"most {model.backend.max_rows} per request (max_rows_per_request, set when it was logged)",
            param="n" if n > 1 else rows_field)
    if count > state.in_flight.limit:
        raise RequestError(
            f"the request asks for {count} choices ({len(rows)} prompts x n={n}); this server generates "
            f"at most {state.in_flight.limit} sequences at once (--max-pending)", param="n" if n > 1 else rows_field)
    if not state.in_flight.try_acquire(count):
        raise RequestError(f"the server is at capacity: {state.in_flight.limit} sequences generating "
                           "or waiting (--max-pending). Retry later", status=429,
                           type="rate_limit_error", code="queue_full")
    aliases = {"max_tokens": "max_completion_tokens"} if getattr(parsed, "max_completion_tokens", None) else {}
    exchange = _Exchange(state, request.scope[RECORD], count, n, aliases, chat)
    for index in range(count):
        # Choice i samples with seed + i, in the model's seed range (0 to 2**63 - 1).
        choice = {**params, "seed": (params["seed"] + index % n) % 2**63} if "seed" in params else params
        # Each prompt generates as a call of its own; a refusal names its place in the request.
        place = index // n
        # On the engine a whole completion is read from a stream too, which a timeout, a client
        # gone or a shutdown cancels; whole batches merge concurrent completions instead.
        if parsed.stream or model.backend.streams_completions:
            exchange.generations.start(index, partial(model.backend.stream, rows[place], choice, place,
                                                      text=parsed.stream), cancellable=True)
        else:
            exchange.generations.start(index, partial(_complete, model.backend, rows[place], choice, place),
                                       cancellable=False)
    reply = Reply(chat=chat, model=model.name, fingerprint=model.fingerprint,
                  include_usage=parsed.include_usage)
    if not parsed.stream:
        # The body is read: what the client sends next is its disconnect, which cancels.
        watch = asyncio.create_task(_when_gone(request, partial(exchange.generations.interrupt, CLIENT_GONE)))
        try:
            completions = await exchange.completions()
        finally:
            watch.cancel()
            exchange.close()
        return Response(reply.whole(completions, n), media_type="application/json")
    try:
        early = await exchange.accepted()
    except BaseException:
        exchange.close()
        raise
    return _Stream(exchange.events(reply, early), on_close=exchange.close)


async def _when_gone(request: Request, then: Callable[[], None]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    then()


def _complete(backend: Any, row: Row, params: dict[str, Any], index: int) -> Iterator[Completion]:
    return iter([backend.complete(row, params, index)])


class _Stream(StreamingResponse):
    """An SSE response that cleans up however it ends (a client gone included)."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _Exchange:
    """One request's sequences: reading their events, and the metrics and log they make."""

    def __init__(self, state: ServerState, record: Record, count: int, n: int,
                 aliases: dict[str, str], chat: bool) -> None:
        self.generations = Generations(state.in_flight)
        self._unwatch = state.watch(self.generations)
        self._metrics = state.metrics
        self._record = record
        self._count = count
        self._n = n
        self._aliases, self._chat = aliases, chat
        self._start = time.perf_counter()
        self._completions: list[Completion | None] = [None] * count
        self._first_text: list[float | None] = [None] * count
        self._failed = False

    def _fail(self, index: int, item: BaseException) -> RequestError:
        error = as_request_error(item, self._aliases, self._chat)
        self._record.outcome = error.code or error.type
        # Index -1: the request was interrupted (timeout, shutdown); else a sequence failed,
        # refused as input or in generation, and what did not finish was not cancelled.
        self._failed = self._failed or index >= 0
        return error

    async def completions(self) -> list[Completion]:
        """Every sequence's completion (they are not streamed)."""
        finished = 0
        while finished < self._count:
            index, item = await self.generations.next()
            if index < 0 or isinstance(item, BaseException):
                raise self._fail(index, item)
            if isinstance(item, Completion):
                self._completed(index, item)
            finished += item is FINISHED
        return self._check_complete()

    async def accepted(self) -> list[tuple[int, Any]]:
        """Wait until every sequence's input is accepted (or raise the first refusal, before any
        response is sent); returns the events that came meanwhile."""
        accepted, early = 0, []
        while accepted < self._count:
            index, item = await self.generations.next()
            if index < 0 or isinstance(item, BaseException):
                raise self._fail(index, item)
            if item is ACCEPTED:
                accepted += 1
            else:
                early.append((index, item))
        return early

    async def events(self, reply: Reply, early: list[tuple[int, Any]]) -> AsyncIterator[bytes]:
        """The stream's events: each choice's role, text and end; usage; ``[DONE]``."""
        if reply.chat:
            for index in range(self._count):
                yield reply.chunk(index, first=True)
        waiting, finished = collections.deque(early), 0
        while finished < self._count:
            index, item = waiting.popleft() if waiting else await self.generations.next()
            if index < 0 or isinstance(item, BaseException):
                yield _error_event(self._fail(index, item))
                yield DONE  # as vLLM does: clients that read to [DONE] stop there, not at a timeout
                return
            if isinstance(item, str) and item:
                if self._first_text[index] is None:
                    self._first_text[index] = time.perf_counter()
                yield reply.chunk(index, item)
            elif isinstance(item, Completion):
                self._completed(index, item)
                yield reply.chunk(index, finish_reason=item.finish_reason)
            finished += item is FINISHED
        try:
            completions = self._check_complete()
        except RequestError as error:
            yield _error_event(error)
            yield DONE
            return
        if reply.include_usage:
            yield reply.usage_chunk(completions, self._n)
        yield DONE

    def _completed(self, index: int, completion: Completion) -> None:
        self._completions[index] = completion
        if index % self._n == 0:  # the choices of a prompt share its prompt tokens
            self._metrics.prompt_tokens.inc(completion.prompt_tokens)
        self._metrics.completion_tokens.inc(completion.completion_tokens)
        first = self._first_text[index]
        if first is not None:
            self._metrics.ttft.observe(first - self._start)
            if completion.completion_tokens > 1:
                self._metrics.tpot.observe((time.perf_counter() - first) / (completion.completion_tokens - 1))
            if self._record.ttft is None:
                self._record.ttft = first - self._start

    def _check_complete(self) -> list[Completion]:
        missing = [i for i, c in enumerate(self._completions) if c is None]
        if missing:
            raise self._fail(missing[0], RuntimeError(f"sequences {missing} ended without a completion"))
        completions: list[Completion] = self._completions  # type: ignore[assignment]
        self._record.prompt_tokens = sum(c.prompt_tokens for c in completions[:: self._n])
        self._record.completion_tokens = sum(c.completion_tokens for c in completions)
        return completions

    def close(self) -> None:
        """Cancel what still runs and stop watching; count what was cut short."""
        stopped = self.generations.cancel()
        self._unwatch()
        cut = sum(self._completions[index] is None for index in stopped)
        if cut and not self._failed:
            self._metrics.cancelled.inc(cut)
            self._record.outcome = self._record.outcome or "cancelled"


def _error_event(error: RequestError) -> bytes:
    return error_event(error.message, type=error.type, param=error.param, code=error.code)
