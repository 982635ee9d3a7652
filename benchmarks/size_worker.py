"""Child process of ``python -m benchmarks --size``: load contenders, time their decode and prefill.

Usage: ``python -m benchmarks.size_worker SPEC``, SPEC a JSON object (see ``full_size.py``);
prints one JSON line, one entry per contender.

A small model is loaded first and dropped, so that the process's one-off costs (lazy imports,
library caches) are paid; then each contender is loaded in turn, timed, its peak RSS taken.
Decode and prefill are timed with the contenders taking turns in every round (medians after a
warm-up). Decode tokens/s counts decode steps only: ``batch x (steps(n) - steps(1)) /
(time(n) - time(1))``, generating ``n`` new tokens and one, so the prompt's prefill cancels out.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import torch

from benchmarks.contenders import plain, render
from benchmarks.measure import current_rss, interleaved_seconds, peak_rss, reset_peak_rss
from benchmarks.settings import prompts
from templated_llm.runtime.memory import cache_bytes_per_token


class _Templated:
    """TemplatedLLM through ``mlflow.pyfunc.load_model`` and ``predict``."""

    def __init__(self, model_uri: str) -> None:
        self.pyfunc = mlflow.pyfunc.load_model(model_uri)
        ours = self.pyfunc.unwrap_python_model()
        self.model = ours.model
        # The KV cache the engine allocates at load, by design: not a copy of the weights.
        self.cache_tokens = ours.engine.config.max_cache_tokens if ours.engine is not None else 0

    def steps(self, texts: list[str], new_tokens: int) -> int:
        frame = self.pyfunc.predict(texts, params={"temperature": 0.0, "max_tokens": new_tokens,
                                                   "return_usage": True})
        return int(frame["completion_tokens"].max())


class _Plain:
    """Plain transformers: one batched ``generate``, left padding, KV cache, eager attention."""

    def __init__(self, snapshot: str, dtype: str) -> None:
        contender = plain(Path(snapshot), getattr(torch, dtype))
        self.model, self.tokenizer = contender.model, contender.extra["tokenizer"]

    def steps(self, texts: list[str], new_tokens: int) -> int:
        batch = self.tokenizer(render(texts), return_tensors="pt", padding=True)
        with torch.inference_mode():
            # The KV cache on, as contenders.generate_texts: MPT checkpoints ship use_cache false.
            output = self.model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                                         use_cache=True, pad_token_id=self.tokenizer.pad_token_id)
        return output.shape[1] - batch["input_ids"].shape[1]


def _load(spec: dict[str, Any], contender: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    gc.collect()
    reset_peak_rss()
    before = current_rss()
    start = time.perf_counter()
    loaded = (_Templated(contender["model_uri"]) if contender["kind"] == "templated"
              else _Plain(spec["snapshot"], contender["dtype"]))
    seconds = time.perf_counter() - start
    dtype = loaded.model.dtype
    cache = getattr(loaded, "cache_tokens", 0) * (cache_bytes_per_token(Path(spec["snapshot"]), dtype) or 0)
    return loaded, {"load_seconds": seconds, "load_peak_bytes": peak_rss() - before,
                    "engine_cache_bytes": cache, "dtype": str(dtype).removeprefix("torch.")}


def _decode(loaded: dict[str, Any], batch: int, new_tokens: int, repeats: int) -> dict[str, dict]:
    texts = prompts(batch)
    steps = {name: (c.steps(texts, new_tokens), c.steps(texts, 1)) for name, c in loaded.items()}
    runs = {}
    for name, c in loaded.items():
        runs[f"{name}/n"] = lambda c=c: c.steps(texts, new_tokens)
        runs[f"{name}/1"] = lambda c=c: c.steps(texts, 1)
    times = interleaved_seconds(runs, repeats)
    result = {}
    for name in loaded:
        many, one = statistics.median(times[f"{name}/n"]), statistics.median(times[f"{name}/1"])
        decoded = batch * (steps[name][0] - steps[name][1])
        # None where noise swamped the difference (only tiny smoke workloads).
        result[name] = {"tokens_per_s": decoded / (many - one) if many > one else None,
                        "decode_steps": steps[name],
                        "seconds": {"n": times[f"{name}/n"], "1": times[f"{name}/1"]}}
    return result


def _prefill(loaded: dict[str, Any], tokens: int, repeats: int) -> dict[str, dict]:
    ids = torch.randint(1, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))

    def forward(model) -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    times = interleaved_seconds({name: (lambda m=c.model: forward(m)) for name, c in loaded.items()},
                                repeats)
    return {name: {"tokens_per_s": tokens / statistics.median(t), "seconds": t} for name, t in times.items()}


def main(spec: dict[str, Any]) -> None:
    warm = mlflow.pyfunc.load_model(spec["warmup_uri"])
    warm.predict(["Hi"], params={"max_tokens": 2})
    del warm
    loaded, results = {}, {}
    for contender in spec["contenders"]:
        loaded[contender["name"]], results[contender["name"]] = _load(spec, contender)
    for batch in spec["batches"]:
        for name, measured in _decode(loaded, batch, spec["new_tokens"], spec["repeats"]).items():
            results[name][f"decode_batch_{batch}"] = measured
    for name, measured in _prefill(loaded, spec["prefill_tokens"], spec["repeats"]).items():
        results[name]["prefill"] = measured
    print(json.dumps({"threads": torch.get_num_threads(), "contenders": results}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
