"""What a benchmark run measures: model size, workload and repeats, with a tiny smoke preset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    d_model: int = 512  # with n_layers=8: about 25M parameters
    n_layers: int = 8
    n_heads: int = 8
    prompts: int = 16
    new_tokens: int = 128
    repeats: int = 3
    # Contenders that generate one prompt at a time (the tutorial pyfunc, the transformers
    # flavor) do the same work per prompt whatever the batch, so their tokens/s is timed on this
    # many of the prompts: on 2 busy CPU cores one of their prompts can take minutes.
    serial_prompts: int = 2
    prefill_tokens: int = 1024
    clients: int = 8
    requests_per_client: int = 1
    serve_tokens: int = 32
    # TemplatedLLM traces every predict where MLflow tracing is on; no other contender traces,
    # so by default it is off for the comparison (python -m benchmarks.tracing measures its cost).
    traced: bool = False

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


SMOKE = Settings(
    d_model=64, n_layers=2, n_heads=4, prompts=2, new_tokens=4, repeats=1, serial_prompts=1,
    prefill_tokens=64, clients=2, requests_per_client=1, serve_tokens=4,
)

_WORDS = ("attention layer", "KV cache", "tokenizer", "batch", "serving stack", "Python library",
          "memory use", "weights", "network", "vector", "matrix", "function", "speed", "river",
          "mountain", "ocean")


def prompts(count: int) -> list[str]:
    """``count`` instructions of varied length, the same in every run."""
    return [
        f"Explain the {_WORDS[i % len(_WORDS)]} of a language model"
        + " in simple words" * (i % 4) + f", example {i}."
        for i in range(count)
    ]


def words(count: int) -> str:
    """``count`` of the benchmark's words in a row, the same in every run: a long prompt."""
    return " ".join(_WORDS[i % len(_WORDS)] for i in range(count))
