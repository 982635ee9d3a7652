"""The serving benchmark's clients: a mixed workload of chat requests, sent by concurrent clients
to one server route, each request timed on the client (first text, each token, the end)."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

# Words the tiny models' tokenizers were trained on: about a token each.
_WORDS = ("the model language machine learning data text token prompt response answer question "
          "write explain describe list name three rivers mountains cities water sea ocean light "
          "time year people world small large fast slow number word attention layer weight "
          "network vector matrix function serve request batch cache memory speed python").split()


@dataclass(frozen=True)
class ChatRequest:
    text: str  # the user's message
    max_tokens: int
    temperature: float
    stop: tuple[str, ...]

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]


def workload(count: int, prompt_words: tuple[int, int], max_tokens: tuple[int, int],
             seed: int = 0, greedy: bool = False) -> list[ChatRequest]:
    """``count`` requests, the same every run: prompts and lengths drawn uniformly from the
    ranges, half greedy and half at temperature 0.7 (all greedy with ``greedy``), a quarter with
    a stop string."""
    rng = random.Random(seed)
    return [ChatRequest(
        text=" ".join(rng.choice(_WORDS) for _ in range(rng.randint(*prompt_words))),
        max_tokens=rng.randint(*max_tokens),
        temperature=0.0 if greedy or i % 2 == 0 else 0.7,
        stop=("river.",) if i % 4 == 1 else (),
    ) for i in range(count)]


@dataclass
class Timing:
    ok: bool
    seconds: float = 0.0
    ttft: float | None = None  # streamed: to the first text
    tpot: float | None = None  # streamed: per token after the first
    tokens: int = 0
    error: str = ""


@dataclass(frozen=True)
class Route:
    """How one server takes a chat request: the path, the body, and the generated tokens in an
    answer (for a stream, in its last event with usage, or its count of text events)."""

    name: str
    path: str
    body: Callable[[ChatRequest, bool], dict[str, Any]]
    tokens: Callable[[dict[str, Any]], int]
    streams: bool


def openai_route(model: str) -> Route:
    def body(request: ChatRequest, stream: bool) -> dict[str, Any]:
        return {"model": model, "messages": request.messages, "max_tokens": request.max_tokens,
                "temperature": request.temperature, **({"stop": list(request.stop)} if request.stop else {}),
                "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}

    return Route("openai", "/v1/chat/completions", body, lambda a: a["usage"]["completion_tokens"], True)


def invocations_route(chat: bool) -> Route:
    """templated-llm's ``/invocations``: ``messages`` for a chat model, else the text as a prompt."""
    def body(request: ChatRequest, stream: bool) -> dict[str, Any]:
        rows = {"messages": [request.messages]} if chat else {"prompt": [request.text]}
        params = {"max_tokens": request.max_tokens, "temperature": request.temperature,
                  "return_usage": True, **({"stop": list(request.stop)} if request.stop else {})}
        return {"inputs": rows, "params": params}

    return Route("invocations", "/invocations", body,
                 lambda a: a["predictions"][0]["completion_tokens"], False)


def mlflow_chat_route() -> Route:
    """MLflow's transformers flavor logged with task ``llm/v1/chat``: OpenAI's chat body at
    ``/invocations``, answered whole."""
    def body(request: ChatRequest, stream: bool) -> dict[str, Any]:
        # The flavor passes temperature 0 to generate, which refuses it: greedy is its default.
        sampling = {"temperature": request.temperature} if request.temperature else {}
        return {"messages": request.messages, "max_tokens": request.max_tokens, **sampling,
                **({"stop": list(request.stop)} if request.stop else {})}

    return Route("mlflow-chat", "/invocations", body, _usage_tokens, False)


def _usage_tokens(answer: Any) -> int:
    answer = answer[0] if isinstance(answer, list) else answer
    return answer["usage"]["completion_tokens"]


async def _send(session: aiohttp.ClientSession, url: str, route: Route, request: ChatRequest,
                stream: bool) -> Timing:
    start = time.perf_counter()
    try:
        async with session.post(url + route.path, json=route.body(request, stream)) as response:
            if response.status != 200:
                return Timing(False, error=f"{response.status}: {(await response.text())[:200]}")
            if not stream:
                tokens = route.tokens(await response.json(content_type=None))
                return Timing(True, time.perf_counter() - start, tokens=tokens)
            return await _read_stream(response, start)
    except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError) as exc:
        return Timing(False, error=f"{type(exc).__name__}: {exc}"[:200])


async def _read_stream(response: aiohttp.ClientResponse, start: float) -> Timing:
    first = last = None
    chunks, tokens = 0, None
    async for line in response.content:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            return Timing(False, error=str(event["error"])[:200])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        if any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
            last = time.perf_counter()
            first = first or last
            chunks += 1
    tokens = tokens if tokens is not None else chunks
    tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return Timing(True, time.perf_counter() - start, first - start if first else None, tpot, tokens)


def run_clients(url: str, route: Route, requests: list[ChatRequest], clients: int,
                stream: bool) -> dict[str, Any]:
    """``clients`` concurrent clients send ``requests`` (each taking the next one when its last is
    answered); what they measured."""
    async def everyone() -> tuple[list[Timing], float]:
        queue = list(reversed(requests))
        timings: list[Timing] = []
        timeout = aiohttp.ClientTimeout(total=3600)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            async def client() -> None:
                while queue:
                    timings.append(await _send(session, url, route, queue.pop(), stream))

            start = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            return timings, time.perf_counter() - start

    timings, seconds = asyncio.run(everyone())
    return summary(timings, seconds)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]}


def summary(timings: list[Timing], seconds: float) -> dict[str, Any]:
    done = [t for t in timings if t.ok]
    return {
        "requests": len(timings), "errors": len(timings) - len(done),
        "error_examples": sorted({t.error for t in timings if not t.ok})[:3],
        "seconds": seconds, "requests_per_s": len(done) / seconds,
        "output_tokens": sum(t.tokens for t in done),
        "output_tokens_per_s": sum(t.tokens for t in done) / seconds,
        "latency_s": _percentiles([t.seconds for t in done]),
        "ttft_s": _percentiles([t.ttft for t in done if t.ttft is not None]),
        "tpot_s": _percentiles([t.tpot for t in done if t.tpot is not None]),
    }
