"""The configuration a logged model carries (MLflow's ``model_config``), shared by log and load."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

DType = Literal["float32", "bfloat16", "float16"]


class LoggedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    plugin: str
    plugin_module: str
    attention: str = "auto"
    dtype: DType | None = None  # None: bfloat16 on GPU, float32 on CPU
    device: str | None = None  # None: CUDA when present, else CPU
    generation_defaults: dict[str, Any] = {}
    templated_llm_version: str = ""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(dtype: DType | None, device: str) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)
