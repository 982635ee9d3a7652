"""The benchmark's MPT snapshot: built once per size, then reused."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.settings import Settings
from templated_llm.devtools.tiny import build_tiny_mpt


def snapshot(settings: Settings, cache: Path) -> Path:
    """The snapshot of ``settings``' size under ``cache``, built there the first time."""
    path = cache / f"mpt-d{settings.d_model}-l{settings.n_layers}-h{settings.n_heads}"
    if not (path / "config.json").is_file():
        build_tiny_mpt(path, d_model=settings.d_model, n_layers=settings.n_layers,
                       n_heads=settings.n_heads)
    return path


def parameters(path: Path) -> int:
    """Parameter count from the safetensors headers, without loading the weights."""
    total = 0
    for file in path.glob("*.safetensors"):
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                total += count
    return total
