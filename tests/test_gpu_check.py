"""The GPU check's code path, on CPU (``--device cpu --smoke``), so it never rots between GPU runs."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest

from benchmarks.gpu import wheels
from benchmarks.gpu.check import F32_REL_TOLERANCE
from conftest import REPO, repo_env

pytestmark = pytest.mark.slow



def test_the_cpu_smoke_run_checks_every_backend_that_can_run_here(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--smoke", "--out", str(out),
         "--work", str(tmp_path / "work")],
        cwd=REPO, timeout=600, capture_output=True, text=True,
        env=repo_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "gpu-check.json").read_text())
    assert not [p for p in results["phases"].values() if "error" in p]
    backends = results["backends"]
    assert "CUDA" in backends["flash"]["skipped"]  # refused by log_llm, with the reason
    assert "triton" in results["skipped"]
    assert backends["auto"]["ran_as"] == "sdpa"
    for name in ("eager", "sdpa", "auto"):
        entry = backends[name]
        assert entry["f32_rel_error"] <= F32_REL_TOLERANCE and entry["f32_greedy_equal"] is True, name
        assert entry["prefill_seconds"] > 0, name
        assert all(d["tokens"] > 0 and d["tokens_per_s"] > 0 for d in entry["decode"].values()), name
        assert set(entry["decode_vs_plain"]) == {"1", "4"} and entry["engine"] is True, name
    for name in ("sdpa", "auto"):
        assert backends[name]["bf16_within_tolerance"] is True, name
    assert results["plain_transformers"]["decode"]["4"]["tokens"] > 0
    whole_batch = backends["auto, whole-batch generate"]
    assert whole_batch["engine"] is False and whole_batch["greedy_equal_to_engine"] is True
    table = (out / "gpu-check.md").read_text()
    assert "| sdpa | sdpa |" in table and "torch" in table


def test_the_wheel_set_brings_mlflow_and_our_runtime_but_not_the_gpu_machines_own_packages():
    names = {requirement.split("==")[0] for requirement in wheels.needed("3.12")}
    assert {"mlflow", "mlflow-skinny", "sqlalchemy", "alembic", "pydantic", "pydantic-core", "pluggy"} <= names
    assert not names & {"torch", "transformers", "accelerate", "pandas", "numpy", "tokenizers"}
    # The UI server's heavy stack stays behind (see wheels._SLIM).
    assert not names & {"scikit-learn", "scipy", "pyarrow", "matplotlib"}


def test_the_platforms_asked_for_cover_the_pinned_wheels_installed_here():
    # pip matches manylinux tags exactly: a pinned release built only for a newer glibc
    # (llguidance 1.9: manylinux_2_31) was not found, and the wheel set failed to build.
    checked = 0
    for requirement in wheels.needed("3.12"):
        try:
            text = importlib.metadata.distribution(requirement.split("==")[0]).read_text("WHEEL") or ""
        except importlib.metadata.PackageNotFoundError:
            continue
        platforms = {line.split("-")[-1] for line in text.splitlines()
                     if line.startswith("Tag:") and "manylinux" in line}
        if platforms:
            checked += 1
            assert platforms & set(wheels.PLATFORMS), (requirement, platforms)
    assert checked >= 3  # cffi, pydantic-core, sqlalchemy, llguidance, ...
