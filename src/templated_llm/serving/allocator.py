"""Keeps the server's freed activation memory mapped, instead of handing it back to the kernel.

glibc's malloc gives each block over its mmap threshold (128 KiB at first, adapting up to 32
MiB) pages of its own and trims the freed tops of its heaps, so the next block of that size
page-faults zero-filled pages in again. A prefill pass allocates its activations afresh in every
layer: a 512-token pass of the serving benchmark's Llama (d_model 512, 8 layers) took 2,200 to
6,300 page faults, and none with fixed thresholds. A server allocates the same sizes all day,
so it keeps them: the process holds the largest set of activations it has needed (it grows with
the model's width and the prefill chunk) rather than faulting it in again on every request.
"""

from __future__ import annotations

import ctypes
import os

# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this come from the heaps (glibc's largest threshold on 64-bit systems)...
MMAP_THRESHOLD = 32 << 20
# ...and up to this much freed memory at a heap's top stays there.
TRIM_THRESHOLD = 1 << 30
OPT_OUT_ENV = "TEMPLATED_LLM_MALLOC_TUNING"
_OFF = ("0", "false", "no", "off")


def _opted_out() -> bool:
    return os.environ.get(OPT_OUT_ENV, "").strip().lower() in _OFF


def keep_freed_memory() -> str:
    """Set glibc's thresholds for this process; say what was done, or why nothing was."""
    if _opted_out():
        return f"malloc left as it is ({OPT_OUT_ENV}={os.environ[OPT_OUT_ENV]})"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (not musl, macOS, Windows)
    except (OSError, AttributeError, TypeError):
        return "malloc left as it is: the C library is not glibc"
    if not (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "malloc left as it is: glibc refused the thresholds"
    return (f"malloc keeps freed memory for reuse (blocks up to {MMAP_THRESHOLD >> 20} MiB from its "
            f"heaps, up to {TRIM_THRESHOLD >> 30} GiB of their free tops kept; {OPT_OUT_ENV}=0 turns this off)")


def malloc_environment() -> dict[str, str]:
    """The same thresholds for a process about to start (glibc reads these variables when it
    starts), unless opted out; a value the environment sets wins where it is merged after."""
    if _opted_out():
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
