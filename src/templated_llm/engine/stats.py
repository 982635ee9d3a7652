"""What the engine reports about itself: load, cache use and latency summaries."""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass

# Latency summaries cover this many most recent sequences.
_WINDOW = 1024


@dataclass(frozen=True)
class LatencySummary:
    """Seconds over the last sequences: ``count`` of them, median and 99th percentile."""

    count: int
    p50: float | None
    p99: float | None


@dataclass(frozen=True)
class EngineStats:
    running: int  # sequences holding a cache slot (prefilling or decoding)
    waiting: int  # sequences queued for a slot
    max_num_seqs: int
    cache_tokens_used: int  # tokens whose keys and values are cached now
    cache_tokens_capacity: int
    tokens_generated: int  # since the engine started
    sequences_finished: int
    sequences_failed: int
    time_to_first_token: LatencySummary
    time_per_output_token: LatencySummary


class StatsRecorder:
    """Counters the scheduler updates and any thread reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ttft: deque[float] = deque(maxlen=_WINDOW)
        self._tpot: deque[float] = deque(maxlen=_WINDOW)
        self.tokens_generated = 0
        self.finished = 0
        self.failed = 0

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self._ttft.append(seconds)

    def finished_sequence(self, tokens: int, decode_seconds: float) -> None:
        with self._lock:
            self.finished += 1
            if tokens > 1:
                self._tpot.append(decode_seconds / (tokens - 1))

    def summaries(self) -> tuple[LatencySummary, LatencySummary]:
        with self._lock:
            return _summary(list(self._ttft)), _summary(list(self._tpot))


def _summary(values: list[float]) -> LatencySummary:
    if not values:
        return LatencySummary(0, None, None)
    if len(values) == 1:
        return LatencySummary(1, values[0], values[0])
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return LatencySummary(len(values), statistics.median(values), cuts[98])
