"""Where a loaded model runs and in which dtype: ``auto`` picks what the device computes natively.

``auto`` is the checkpoint's own dtype (``dtype`` or ``torch_dtype`` in its config.json) where
the device computes it natively, else float32:

- on CUDA, bfloat16 where the GPU supports it, else float16 (reduced precision on a GPU, as
  before: tensor cores, half the memory);
- on CPU, bfloat16 for a bfloat16 checkpoint where the CPU has bf16 instructions (x86: AMX or
  AVX512-BF16; Arm: BF16), which oneDNN's kernels use; without them bf16 is emulated and
  slower than float32, so float32.

An explicit dtype wins. One the device cannot compute at all is refused; one it only emulates
runs, with a warning saying what it costs.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from templated_llm.errors import ConfigError, DTypeUnavailableError, EmulatedDTypeWarning

AUTO = "auto"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# The CPU flags (torch.cpu.get_capabilities / /proc/cpuinfo names) that compute each natively.
_CPU_NATIVE_FLAGS = {
    "bfloat16": ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16"),
    "float16": ("amx_fp16", "avx512_fp16", "fp16_arith"),
}


def default_device() -> str:
    """CUDA when this process sees a GPU, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_device(requested: str | None) -> str:
    """The device a model loads on: ``requested`` (a ``model_config``'s ``device``) as torch
    names it, checked to be present here, or :func:`default_device`. ``cpu:0`` is ``cpu``: the
    CPU paths (weight packing, dtype conversion) then apply to it as well."""
    if requested is None:
        return default_device()
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"model_config: device {requested!r} is not a device torch knows ({exc}); "
                          "use 'cpu', 'cuda' or 'cuda:N', or leave it unset") from None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ConfigError(f"model_config: device {requested!r} needs a CUDA GPU; this process sees "
                              f"{count or 'none'}. Use device='cpu', or leave it unset to use a GPU when there is one")
        return str(device)
    if device.type == "mps" and torch.backends.mps.is_available():
        return str(device)
    raise ConfigError(f"model_config: device {requested!r} cannot run a model here; use 'cpu', 'cuda' or "
                      "'cuda:N' (or 'mps' on Apple silicon), or leave it unset")


@dataclass(frozen=True)
class DTypeChoice:
    """The dtype a model loads in, and why (logged at load)."""

    name: str
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.name)


def checkpoint_dtype(snapshot: Path) -> str | None:
    """The dtype the snapshot's config.json declares for its weights, if one we know."""
    try:
        config = json.loads((Path(snapshot) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    declared = config.get("dtype") or config.get("torch_dtype")  # transformers 5, 4
    return declared if declared in DTYPE_NAMES else None


def _cpu_flags() -> set[str]:
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.10
    if capabilities is not None:
        return {name for name, value in capabilities().items() if value is True}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith(("flags", "Features"))
            for flag in line.split(":", 1)[1].split()}


def cpu_native_flag(name: str) -> str | None:
    """The CPU flag by which this CPU computes dtype ``name`` natively, or ``None``."""
    if name == "float32":
        return "float32"
    if not torch.backends.mkldnn.is_available():  # the kernels that use the instructions
        return None
    found = _cpu_flags()
    return next((flag for flag in _CPU_NATIVE_FLAGS.get(name, ()) if flag in found), None)


def dtype_unavailable(name: str, device: str) -> str | None:
    """Why dtype ``name`` cannot run on ``device`` at all, or ``None`` if it can."""
    if name not in DTYPE_NAMES:
        return f"unknown dtype {name!r}; choose one of {[AUTO, *DTYPE_NAMES]}"
    if name == "bfloat16" and device.startswith("cuda") and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        return (f"dtype 'bfloat16' needs a GPU with bfloat16 support (compute capability 8.0 or "
                f"later); {torch.cuda.get_device_name(device)} has none. Use dtype='float16' or "
                "'auto'.")
    return None


def check_dtype(requested: str, device: str) -> None:
    """Raise :class:`DTypeUnavailableError` when ``requested`` cannot run on ``device``."""
    if requested == AUTO:
        return
    reason = dtype_unavailable(requested, device)
    if reason is not None:
        raise DTypeUnavailableError(reason)


def _auto(device: str, checkpoint: str | None) -> DTypeChoice:
    stored = f"the checkpoint is {checkpoint}" if checkpoint else "the checkpoint declares no dtype"
    if device.startswith("cuda"):
        if checkpoint == "float16":
            return DTypeChoice("float16", f"{stored}, which the GPU computes natively")
        if torch.cuda.is_bf16_supported():
            return DTypeChoice("bfloat16", f"{stored}; the GPU computes bfloat16 natively")
        return DTypeChoice("float16", f"{stored}; the GPU has no bfloat16, float16 instead")
    if device != "cpu":
        return DTypeChoice("float32", f"{stored}; no native-dtype rule for device {device!r}")
    if checkpoint == "bfloat16":
        flag = cpu_native_flag("bfloat16")
        if flag is not None:
            return DTypeChoice("bfloat16", f"{stored} and this CPU computes it natively ({flag})")
        return DTypeChoice("float32", f"{stored}, but this CPU has no bfloat16 instructions "
                                      "(amx_bf16, avx512_bf16; bf16 on Arm): emulated, it would be "
                                      "slower than float32")
    if checkpoint == "float16":
        return DTypeChoice("float32", f"{stored}; on CPU auto picks bfloat16 or float32")
    return DTypeChoice("float32", stored)


def choose_dtype(requested: str, device: str, snapshot: Path | None) -> DTypeChoice:
    """The dtype to load in: ``requested``, or ``auto``'s choice for ``device`` and the snapshot.

    Raises :class:`DTypeUnavailableError` for a dtype ``device`` cannot run; warns with
    :class:`EmulatedDTypeWarning` for one a CPU only emulates.
    """
    check_dtype(requested, device)
    if requested == AUTO:
        return _auto(device, checkpoint_dtype(snapshot) if snapshot is not None else None)
    if device == "cpu" and requested != "float32" and cpu_native_flag(requested) is None:
        warnings.warn(
            f"dtype {requested!r} on this CPU is emulated (it has none of "
            f"{list(_CPU_NATIVE_FLAGS[requested])}): it halves the weights' memory but runs "
            "slower than float32; dtype='auto' picks float32 here",
            EmulatedDTypeWarning, stacklevel=2,
        )
    return DTypeChoice(requested, "asked for explicitly")
