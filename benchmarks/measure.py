"""Timing and memory measurements: runs taking turns after a warm-up, peak RSS from /proc."""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def interleaved_seconds(
    runs: dict[str, Callable[[], object]], repeats: int, warm_up_seconds: dict[str, float] | None = None,
    min_round_seconds: float = 0.0,
) -> dict[str, list[float]]:
    """Wall times of each run, ``repeats`` rounds after a warm-up round, the runs taking turns
    (their order rotating every round) so that load from elsewhere hits them all alike.

    The warm-up round pays what a first call pays once (compiling, allocating, caches); its
    times go into ``warm_up_seconds`` when given, never into the timed rounds. With
    ``min_round_seconds``, a run shorter than that is called enough times in a row per round
    to last it, and its time is the mean of those calls: a single sub-millisecond call is
    mostly timer and thread wake-up noise.
    """
    calls = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        if warm_up_seconds is not None:
            warm_up_seconds[name] = elapsed
        calls[name] = max(1, math.ceil(min_round_seconds / max(elapsed, 1e-9)))
    names, times = list(runs), {name: [] for name in runs}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start = time.perf_counter()
            for _ in range(calls[name]):
                runs[name]()
            times[name].append((time.perf_counter() - start) / calls[name])
    return times


def cpu_time_shares(call: Callable[[], object]) -> dict[str, float]:
    """Each operator's share of the self CPU time of one ``call`` (torch profiler), largest first."""
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile

    # Every thread's operators: predict runs the model on the engine's scheduler thread.
    with profile(activities=[ProfilerActivity.CPU],
                 experimental_config=_ExperimentalConfig(profile_all_threads=True)) as prof:
        call()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return {e.key: e.self_cpu_time_total / total for e in events}


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of the per-round ratios: robust to a round slowed down for everyone."""
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def speedup(slower: list[float], faster: list[float]) -> dict[str, float]:
    """Median and quartiles of the per-round ratios ``slower / faster``."""
    ratios = sorted(s / f for s, f in zip(slower, faster))
    low, median, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"median": median, "q1": low, "q3": high}


def _status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


def current_rss() -> int:
    return _status_bytes("VmRSS")


def reset_peak_rss() -> None:
    """Restart the kernel's high-water mark (VmHWM) at the current RSS (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    return _status_bytes("VmHWM")


def weight_bytes(snapshot: Path) -> int:
    return sum(f.stat().st_size for f in snapshot.iterdir() if f.suffix in (".safetensors", ".bin"))


# The CPU flags (/proc/cpuinfo) that decide whether bfloat16 is computed natively: x86's AMX and
# AVX512-BF16, Arm's BF16; AVX-512 for float32.
_BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "bf16")


def bf16_flags(cpu_flags: list[str]) -> str:
    """Which of the flags that matter for bfloat16 the CPU has, as one line."""
    found = [flag for flag in _BF16_FLAGS if flag in cpu_flags]
    return " ".join(found) or "none of " + " ".join(_BF16_FLAGS)
