"""Shared fixtures: a small MPT snapshot, a real MLflow store in a temp dir, a logged model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the suite may wait on the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The product's own settings (tracing, memory limit, API key) come from each test, never from
# the shell that started the suite.
for _name in [name for name in os.environ if name.startswith("TEMPLATED_LLM_")]:
    del os.environ[_name]


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# The suite runs in pytest-xdist workers (`-n auto`). They share the cores: each worker's torch,
# and the processes it starts, get their share, set before torch is imported (threads beyond
# the cores make every worker crawl).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = _cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

import mlflow  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from templated_llm.devtools.tiny import build_tiny_model, build_tiny_mpt  # noqa: E402
from templated_llm.model_logging.log import log_llm  # noqa: E402
from templated_llm.plugins import manager as plugin_manager  # noqa: E402

# No deadlines: a deadline is a timing assertion, and these machines are noisy. CI replays the
# same examples every run (HYPOTHESIS_PROFILE=ci), so a failure there is never luck of the draw;
# local runs keep exploring new ones.
settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per core, at most four (each holds torch, MLflow and its servers)."""
    return min(4, _cpus())


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mpt(tmp_path_factory.mktemp("snapshots") / "tiny-mpt", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_model(architecture, **options)``: a small random snapshot, built once per session."""
    built: dict[tuple, Path] = {}

    def build(architecture: str, **options) -> Path:
        key = (architecture, *sorted((k, str(v)) for k, v in options.items()))
        if key not in built:
            path = tmp_path_factory.mktemp("snapshots") / architecture
            built[key] = build_tiny_model(architecture, path, **options)
        return built[key]

    return build


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite tracking store in a temp dir, also seen by child processes."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    # Artifacts next to the store, not in the directory pytest was started from.
    experiment = mlflow.create_experiment("tests", artifact_location=(root / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment
    return uri


@pytest.fixture(scope="session")
def logged_model(tiny_snapshot: Path):
    return log_llm("mpt-instruct", snapshot=tiny_snapshot)


@pytest.fixture(scope="session")
def loaded_model(logged_model):
    return mlflow.pyfunc.load_model(logged_model.model_uri, model_config={"device": "cpu"})


@pytest.fixture
def fresh_plugins():
    """A plugin manager rebuilt from entry points, and rebuilt again afterwards."""
    plugin_manager.reset_plugin_manager()
    yield plugin_manager.get_plugin_manager()
    plugin_manager.reset_plugin_manager()


REPO = Path(__file__).resolve().parents[1]


def repo_env(**extra: str) -> dict[str, str]:
    """This environment for a subprocess that runs the repository's modules (``python -m
    benchmarks...``): the repository first on ``PYTHONPATH``, the caller's entries kept after it."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_python(code: str, env: dict[str, str] | None = None) -> object:
    """Run ``code`` in a fresh interpreter and return what it printed as JSON on its last line."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def fallback_model(tiny_snapshot: Path):
    """The tiny MPT logged to generate whole batches (engine=False), as before the engine."""
    info = log_llm("mpt-instruct", snapshot=tiny_snapshot, name="whole-batch", engine=False)
    # On the CPU, as loaded_model: tests compare the two token for token (a GPU picks bf16).
    return mlflow.pyfunc.load_model(info.model_uri, model_config={"device": "cpu"})
