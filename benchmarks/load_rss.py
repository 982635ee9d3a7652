"""Child process: peak RSS of ``mlflow.pyfunc.load_model`` and of a first predict.

Usage: python -m benchmarks.load_rss MODEL_URI SNAPSHOT_DIR REQUEST, where REQUEST is the JSON
of predict's arguments ``{"input": ..., "params": ...}``; prints one JSON line.

The model is loaded (and predicts) twice. The first round also pays what any model costs once per
process (imports done lazily, library caches); the second, after the first model is gone, is what
this model costs: it is the figure. Both are reported, with the load's wall time, as ratios to the
bytes of the weights at the dtype the model loaded in, and for TemplatedLLM the KV cache its
engine allocates at load (``engine_cache_bytes``).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import torch
from mlflow.exceptions import MlflowException

from benchmarks.measure import current_rss, peak_rss, reset_peak_rss
from templated_llm.runtime.device import checkpoint_dtype
from templated_llm.runtime.memory import weight_bytes


def _python_model(model: mlflow.pyfunc.PyFuncModel) -> Any:
    """The PythonModel of a TemplatedLLM or the tutorial pyfunc; ``None`` for other flavors."""
    try:
        return model.unwrap_python_model()
    except MlflowException:  # not a PythonModel (the transformers flavor)
        return None


def _engine_cache_bytes(model: mlflow.pyfunc.PyFuncModel) -> int:
    """The KV cache a TemplatedLLM's engine allocated at load (keys and values of every slot);
    0 for a model without one."""
    python_model = _python_model(model)
    engine = getattr(python_model, "engine", None)
    if engine is None:
        return 0
    # Imported once loaded: the model's own copy of templated_llm (its code_paths) is the one.
    from templated_llm.engine import SlotCache

    config = python_model.model.config
    return engine.config.max_cache_tokens * SlotCache.bytes_per_token(
        config.n_layers, config.n_heads, config.d_model // config.n_heads, python_model.model.dtype)


def _round(model_uri: str, request: dict) -> dict:
    gc.collect()
    reset_peak_rss()
    before = current_rss()
    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(model_uri)
    seconds = time.perf_counter() - start
    load = peak_rss() - before
    dtype = _dtype(model)
    model.predict(request["input"], params=request.get("params"))
    predict = peak_rss() - before
    cache = _engine_cache_bytes(model)
    del model
    gc.collect()
    return {"load_peak_bytes": load, "load_and_predict_peak_bytes": predict,
            "load_seconds": seconds, "dtype": dtype, "engine_cache_bytes": cache}


def _dtype(model: mlflow.pyfunc.PyFuncModel) -> str | None:
    """The dtype a TemplatedLLM or the tutorial pyfunc loaded in; ``None`` for other flavors."""
    python_model = _python_model(model)
    return None if python_model is None else str(python_model.model.dtype).removeprefix("torch.")


def main(model_uri: str, snapshot: str, request: dict) -> None:
    first = _round(model_uri, request)
    second = _round(model_uri, request)
    snapshot = Path(snapshot)
    dtype = second["dtype"] or checkpoint_dtype(snapshot) or "float32"
    weights = weight_bytes(snapshot, getattr(torch, dtype))
    print(json.dumps({
        "weights_bytes": weights,
        "first_load_in_process": first,
        **second,
        "load_ratio": second["load_peak_bytes"] / weights,
        "load_and_predict_ratio": second["load_and_predict_peak_bytes"] / weights,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
