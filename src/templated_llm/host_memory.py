"""The memory this host says is available: Linux's MemAvailable.

Below the engine and the runtime both, so that the engine sizing its cache and the memory check
before a load read the one figure the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

_MEMINFO = Path("/proc/meminfo")


def mem_available() -> int | None:
    """Bytes the kernel reports available for new work without swapping (MemAvailable in
    /proc/meminfo); ``None`` where it does not say (no /proc: macOS, Windows)."""
    try:
        text = _MEMINFO.read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None
