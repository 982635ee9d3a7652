"""Child process: peak RSS of ``mlflow.pyfunc.load_model`` and of a first predict.

Usage: python -m benchmarks.load_rss MODEL_URI SNAPSHOT_DIR REQUEST, where REQUEST is the JSON
of predict's arguments ``{"input": ..., "params": ...}``; prints one JSON line.

The model is loaded (and predicts) twice. The first round also pays what any model costs once per
process (imports done lazily, library caches); the second, after the first model is gone, is what
this model costs: it is the figure. Both are reported, and for TemplatedLLM the KV cache its
engine allocates at load (``engine_cache_bytes``).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import mlflow.pyfunc
from mlflow.exceptions import MlflowException

from benchmarks.measure import current_rss, peak_rss, reset_peak_rss, weight_bytes


def _engine_cache_bytes(model: mlflow.pyfunc.PyFuncModel) -> int:
    """The KV cache a TemplatedLLM's engine allocated at load (keys and values of every slot);
    0 for a model without one."""
    try:
        python_model = model.unwrap_python_model()
    except MlflowException:  # not a PythonModel (the transformers flavor)
        return 0
    engine = getattr(python_model, "engine", None)
    if engine is None:
        return 0
    # Imported once loaded: the model's own copy of templated_llm (its code_paths) is the one.
    from templated_llm.engine import SlotCache

    config = python_model.model.config
    return engine.config.max_cache_tokens * SlotCache.bytes_per_token(
        config.n_layers, config.n_heads, config.d_model // config.n_heads, python_model.model.dtype)


def _round(model_uri: str, request: dict) -> dict[str, int]:
    gc.collect()
    reset_peak_rss()
    before = current_rss()
    model = mlflow.pyfunc.load_model(model_uri)
    load = peak_rss() - before
    model.predict(request["input"], params=request.get("params"))
    predict = peak_rss() - before
    cache = _engine_cache_bytes(model)
    del model
    gc.collect()
    return {"load_peak_bytes": load, "load_and_predict_peak_bytes": predict, "engine_cache_bytes": cache}


def main(model_uri: str, snapshot: str, request: dict) -> None:
    weights = weight_bytes(Path(snapshot))
    first = _round(model_uri, request)
    second = _round(model_uri, request)
    print(json.dumps({
        "weights_bytes": weights,
        "first_load_in_process": first,
        **second,
        "load_ratio": second["load_peak_bytes"] / weights,
        "load_and_predict_ratio": second["load_and_predict_peak_bytes"] / weights,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
