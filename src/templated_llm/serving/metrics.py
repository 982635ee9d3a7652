"""The server's Prometheus metrics, served at ``/metrics``.

Engine figures (running and waiting sequences, cache use, ...) come from the backend's stats
object, each numeric field a gauge ``templated_llm_engine_<field>``; a model without an engine
has none, and none are shown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, engine_stats: Callable[[], Any | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("templated_llm_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.request_seconds = Histogram("templated_llm_request_duration_seconds",
                                         "HTTP request latency, to the end of the body", ["route"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("templated_llm_prompt_tokens", "prompt tokens read", registry=r)
        self.completion_tokens = Counter("templated_llm_completion_tokens", "tokens generated",
                                         registry=r)
        self.ttft = Histogram("templated_llm_time_to_first_token_seconds",
                              "streamed requests: from arrival to the first text", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("templated_llm_time_per_output_token_seconds",
                              "streamed requests: seconds per token after the first", buckets=_TOKEN_BUCKETS,
                              registry=r)
        self.sequences = Gauge("templated_llm_sequences_in_flight",
                               "sequences the server is generating or waiting on", registry=r)
        self.cancelled = Counter("templated_llm_sequences_cancelled",
                                 "sequences stopped before their end: client gone, timeout, shutdown",
                                 registry=r)
        r.register(_EngineStats(engine_stats))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineStats:
    def __init__(self, stats: Callable[[], Any | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        for name, value in _numbers(self._stats()).items():
            yield GaugeMetricFamily(f"templated_llm_engine_{name}", f"engine stats: {name}", value=value)


def _numbers(stats: Any | None) -> dict[str, float]:
    if stats is None:
        return {}
    if dataclasses.is_dataclass(stats):
        fields = dataclasses.asdict(stats)
    elif hasattr(stats, "model_dump"):
        fields = stats.model_dump()
    else:
        fields = vars(stats)
    return _flat(fields)


def _flat(fields: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric fields, nested ones (a latency summary's p50) named ``outer_inner``."""
    numbers = {}
    for key, value in fields.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            numbers.update(_flat(value, f"{prefix}{key}_"))
        elif isinstance(value, int | float):
            numbers[f"{prefix}{key}"] = float(value)
    return numbers
