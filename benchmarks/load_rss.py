"""Child process: peak RSS of ``mlflow.pyfunc.load_model``, then of a first predict.

Usage: python -m benchmarks.load_rss MODEL_URI SNAPSHOT_DIR REQUEST, where REQUEST is the JSON
of predict's arguments ``{"input": ..., "params": ...}``; prints one JSON line.
The imports a load needs happen first, so the figures count the model, not the libraries.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow.pyfunc
import transformers  # noqa: F401
import transformers.models.mpt.modeling_mpt  # noqa: F401

import templated_llm.pyfunc  # noqa: F401
from benchmarks.measure import current_rss, peak_rss, reset_peak_rss, weight_bytes


def main(model_uri: str, snapshot: str, request: dict) -> None:
    weights = weight_bytes(Path(snapshot))
    reset_peak_rss()
    before = current_rss()
    model = mlflow.pyfunc.load_model(model_uri)
    load_peak = peak_rss() - before
    model.predict(request["input"], params=request.get("params"))
    predict_peak = peak_rss() - before
    print(json.dumps({"weights_bytes": weights, "load_peak_bytes": load_peak,
                      "load_and_predict_peak_bytes": predict_peak,
                      "load_ratio": load_peak / weights,
                      "load_and_predict_ratio": predict_peak / weights}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
