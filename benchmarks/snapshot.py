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
    _never_end_early(path)
    return path


def _never_end_early(path: Path) -> None:
    """Suppress the end-of-text token in the snapshot's generation config.

    Every contender's ``generate`` reads this config, so no row of any contender can end before
    its ``max_tokens``: all do the same work, and tokens/s compares like with like. (A random
    model may well pick the end token; the contenders count their tokens and fail if one did.)
    """
    file = path / "generation_config.json"
    config = json.loads(file.read_text())
    config["suppress_tokens"] = [config["eos_token_id"]]
    file.write_text(json.dumps(config, indent=2) + "\n")


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
