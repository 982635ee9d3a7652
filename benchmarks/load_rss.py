"""Child process: peak RSS of ``mlflow.pyfunc.load_model`` and of a first predict.

Usage: python -m benchmarks.load_rss MODEL_URI SNAPSHOT_DIR REQUEST, where REQUEST is the JSON
of predict's arguments ``{"input": ..., "params": ...}``; prints one JSON line.

The model is loaded (and predicts) twice. The first round also pays what any model costs once per
process (imports done lazily, library caches); the second, after the first model is gone, is what
this model costs: it is the figure. Both are reported.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import mlflow.pyfunc

from benchmarks.measure import current_rss, peak_rss, reset_peak_rss, weight_bytes


def _round(model_uri: str, request: dict) -> dict[str, int]:
    gc.collect()
    reset_peak_rss()
    before = current_rss()
    model = mlflow.pyfunc.load_model(model_uri)
    load = peak_rss() - before
    model.predict(request["input"], params=request.get("params"))
    predict = peak_rss() - before
    del model
    gc.collect()
    return {"load_peak_bytes": load, "load_and_predict_peak_bytes": predict}


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
