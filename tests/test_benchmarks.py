"""The benchmark harness runs end to end in its tiny configuration (no timings asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import FIGURE_IDS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _smoke_run(module: str, tmp_path: Path, result: str) -> dict:
    subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--out", str(tmp_path / "results"),
         "--cache", str(tmp_path / "cache")],
        cwd=REPO, check=True, timeout=900, capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return json.loads((tmp_path / "results" / result).read_text())


def test_the_smoke_run_reports_every_figure_and_contender(tmp_path):
    results = _smoke_run("benchmarks", tmp_path, "latest.json")
    assert set(results["figures"]) == set(FIGURE_IDS)
    for key, entry in results["figures"].items():
        if entry["value"] is None:  # skipped, and it says why
            assert entry["note"] and entry["met"] is None, key
        else:
            assert math.isfinite(entry["value"]) and entry["value"] >= 0, key
            assert isinstance(entry["met"], bool) and entry["target"], key
    assert {"tutorial", "plain", "transformers_flavor", "templated_eager"} <= set(results["contenders"])
    assert all(c["tokens_per_s"] > 0 for c in results["contenders"].values())
    assert results["figures"]["loads_during_log"]["value"] == 0
    table = (tmp_path / "results" / "latest.md").read_text()
    assert all(entry["description"] in table for entry in results["figures"].values())
    assert (tmp_path / "results" / "latest.png").read_bytes().startswith(b"\x89PNG")


def test_the_mixed_workload_smoke_run_reports_every_contender(tmp_path):
    results = _smoke_run("benchmarks.mixed", tmp_path, "mixed.json")
    assert set(results["contenders"]) == {"engine_mpt", "micro_batcher_mpt", "engine_llama",
                                          "transformers_cb_llama"}
    for name, summary in results["contenders"].items():
        assert summary["output_tokens"] > 0 and summary["tokens_per_s"] > 0, name
    assert all(math.isfinite(v) and v > 0 for v in results["ratios"].values())


def test_the_serving_smoke_run_measures_every_contender_without_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.serving", "--smoke", "--out", str(tmp_path / "results"),
         "--cache", str(tmp_path / "cache")],
        cwd=REPO, timeout=1500, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "results" / "serving.json").read_text())
    assert {r["contender"] for r in results["runs"]} == set(results["contenders"])
    assert all(r["errors"] == 0 and r["output_tokens"] > 0 for r in results["runs"]), results["runs"]
    streamed = [r for r in results["runs"] if r["stream"]]
    assert streamed and all(r["ttft_s"]["p50"] > 0 for r in streamed)
    assert all(f["value"] is not None for f in results["figures"])
    table = (tmp_path / "results" / "serving.md").read_text()
    assert all(f["figure"] in table for f in results["figures"])
