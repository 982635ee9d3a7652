"""Timing and memory measurements: medians after a warm-up, peak RSS from /proc."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def median_seconds(run: Callable[[], object], repeats: int, warmup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``repeats`` calls of ``run``, after one call of ``warmup`` (or ``run``)."""
    (warmup or run)()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
