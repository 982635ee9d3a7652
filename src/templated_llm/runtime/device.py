"""Where a loaded model runs and in which dtype, unless the logged model says."""

from __future__ import annotations

import torch


def default_device() -> str:
    """CUDA when this process sees a GPU, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(dtype: str | None, device: str) -> torch.dtype:
    """The weights' dtype: ``dtype`` by name, or bfloat16 on GPU and float32 on CPU."""
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)
