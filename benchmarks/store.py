"""A throwaway MLflow store for one benchmark run."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def temporary_store(experiment_name: str) -> Iterator[Path]:
    """A SQLite tracking store and an experiment in a temp dir, also seen by child processes;
    deleted afterwards."""
    store = Path(tempfile.mkdtemp(prefix="templated-llm-bench-"))
    try:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
        import mlflow

        experiment = mlflow.create_experiment(experiment_name, artifact_location=(store / "artifacts").as_uri())
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment
        mlflow.set_experiment(experiment_id=experiment)
        yield store
    finally:
        shutil.rmtree(store, ignore_errors=True)
