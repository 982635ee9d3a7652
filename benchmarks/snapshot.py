"""The benchmark's MPT snapshot: built once per size, then reused."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.settings import Settings
from templated_llm.devtools.tiny import build_tiny_model, build_tiny_mpt


def dtype_suffix(dtype: str) -> str:
    """What names a snapshot or results file stored in ``dtype``: nothing for float32."""
    return "" if dtype == "float32" else f"-{dtype}"


def snapshot(settings: Settings, cache: Path, dtype: str = "float32") -> Path:
    """The snapshot of ``settings``' size under ``cache``, built there the first time, its
    weights stored in ``dtype`` (the same seed: another dtype holds the same weights, rounded)."""
    path = cache / f"mpt-d{settings.d_model}-l{settings.n_layers}-h{settings.n_heads}{dtype_suffix(dtype)}"
    if not (path / "config.json").is_file():
        build_tiny_mpt(path, d_model=settings.d_model, n_layers=settings.n_layers,
                       n_heads=settings.n_heads, dtype=dtype)
    _never_end_early(path)
    return path


def tiny_snapshots(cache: Path, d_model: int, n_layers: int, n_heads: int) -> dict[str, Path]:
    """An MPT and a Llama snapshot of one size under ``cache``, each built the first time."""
    snapshots = {}
    for architecture in ("mpt", "llama"):
        path = cache / f"{architecture}-d{d_model}-l{n_layers}-h{n_heads}"
        if not (path / "config.json").is_file():
            build_tiny_model(architecture, path, hidden_size=d_model, n_layers=n_layers, n_heads=n_heads)
        snapshots[architecture] = path
    return snapshots


def _never_end_early(path: Path) -> None:
    """Make the end-of-text token unreachable for greedy decoding, whoever decodes.

    MPT ties its output layer to the token embeddings: with the end token's row zero, its logit
    is 0 at every step, while a random model's largest logit over the rest of the vocabulary is
    far above 0 (a zero-mean logit per token: all of them below 0 has odds of 2^-(vocab - 1)).
    So no contender's greedy row ends before its ``max_tokens``, whatever decodes it
    (transformers' ``generate``, MLflow's pipeline, templated-llm's engine), and all do the same
    work. The row is only ever read for the end token, which no prompt contains (it pads, masked).
    The contenders still count their tokens, and fail on a shortfall.
    """
    from safetensors.torch import load_file, save_file

    eos = json.loads((path / "config.json").read_text())["eos_token_id"]
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    embeddings = tensors["transformer.wte.weight"]
    if embeddings[eos].any():
        embeddings[eos] = 0
        save_file(tensors, weights, metadata={"format": "pt"})


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
