"""The benchmark harnesses run end to end in their tiny configuration (no timings asserted), counts
every contender's tokens, and the docs show the figures of the reference results."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from benchmarks import decode_attention, linear, pages
from benchmarks.counting import TokenShortfall, check_tokens, generate_spy
from benchmarks.measure import bf16_flags, interleaved_seconds
from benchmarks.report import FIGURE_IDS
from conftest import REPO, repo_env
from templated_llm.engine import attention
from templated_llm.runtime.packed_linear import packing_available



def _smoke_run(module: str, tmp_path: Path, result: str) -> dict:
    subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--out", str(tmp_path / "results"),
         "--cache", str(tmp_path / "cache")],
        cwd=REPO, check=True, timeout=900, capture_output=True,
        env=repo_env(),
    )
    return json.loads((tmp_path / "results" / result).read_text())


@pytest.mark.slow
def test_the_smoke_run_reports_every_figure_and_contender(tmp_path):
    results = _smoke_run("benchmarks", tmp_path, "latest.json")
    assert set(results["figures"]) == set(FIGURE_IDS)
    for key, entry in results["figures"].items():
        if entry["value"] is None:  # skipped, and it says why
            assert entry["note"] and entry["met"] is None, key
        else:
            assert math.isfinite(entry["value"]) and entry["value"] >= 0, key
            assert isinstance(entry["met"], bool) and entry["target"], key
    assert {"tutorial", "plain", "transformers_flavor", "transformers_flavor_fair", "templated_sdpa",
            "templated_eager"} <= set(results["contenders"])
    assert results["headline"] == "templated_sdpa"  # what log_llm's default, auto, runs on CPU
    assert set(results["templated_backends_unavailable"]) == {"flash", "triton"}  # on a CPU
    assert all(c["tokens_per_s"] > 0 and c["warm_up_seconds"] > 0 for c in results["contenders"].values())
    assert results["machine"]["cpu_model"] and results["machine"]["load_average_end"]
    assert results["figures"]["loads_during_log"]["value"] == 0
    table = (tmp_path / "results" / "latest.md").read_text()
    assert all(entry["description"] in table for entry in results["figures"].values())
    # Untraced by default, as no other contender traces, and the table says so.
    assert results["settings"]["traced"] is False and "traces its predicts: no" in table
    assert (tmp_path / "results" / "latest.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_the_mixed_workload_smoke_run_reports_every_contender(tmp_path):
    results = _smoke_run("benchmarks.mixed", tmp_path, "mixed.json")
    assert set(results["contenders"]) == {"engine_mpt", "micro_batcher_mpt", "engine_llama",
                                          "transformers_cb_llama"}
    for name, summary in results["contenders"].items():
        assert summary["output_tokens"] > 0 and summary["tokens_per_s"] > 0, name
    assert all(math.isfinite(v) and v > 0 for v in results["ratios"].values())


@pytest.mark.slow
def test_the_serving_smoke_run_measures_every_contender_without_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.serving", "--smoke", "--out", str(tmp_path / "results"),
         "--cache", str(tmp_path / "cache")],
        cwd=REPO, timeout=1500, capture_output=True, text=True,
        env=repo_env(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "results" / "serving.json").read_text())
    assert {r["contender"] for r in results["runs"]} == set(results["contenders"])
    assert {r["round"] for r in results["runs"]} == {0, 1}  # the smoke run's two rounds
    assert all(r["errors"] == 0 and r["output_tokens"] > 0 for r in results["runs"]), results["runs"]
    streamed = [r for r in results["runs"] if r["stream"]]
    assert streamed and all(r["ttft_s"]["p50"] > 0 for r in streamed)
    assert all(f["value"] is not None for f in results["figures"])
    table = (tmp_path / "results" / "serving.md").read_text()
    assert all(f["figure"] in table for f in results["figures"])


class _Generating:
    """A stand-in model whose generate returns ``new`` rows of new tokens after the prompt."""

    def __init__(self, new: list[list[int]]) -> None:
        self.new = new
        self.generation_config = GenerationConfig(eos_token_id=0, pad_token_id=0)

    def generate(self, input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor(self.new)], dim=1)


def test_a_contender_that_generates_fewer_tokens_than_asked_stops_the_run():
    ended_early = _Generating([[5, 6, 7], [5, 0, 0]])  # the second row hit the end token
    counted = generate_spy(ended_early)
    ended_early.generate(torch.ones(2, 4, dtype=torch.long))
    assert counted.take() == [3, 1] and counted.take() == []
    with pytest.raises(TokenShortfall, match=r"generated \[3, 1\] new tokens .* 3 were asked"):
        check_tokens("contender", [3, 1], rows=2, max_tokens=3)
    with pytest.raises(TokenShortfall):
        check_tokens("contender", [], rows=1, max_tokens=3)  # nothing generated at all
    check_tokens("contender", [3, 3], rows=2, max_tokens=3)


def test_the_serving_workload_is_half_sampled_unless_all_greedy():
    from benchmarks.serving_load import workload

    mixed, greedy = workload(8, (4, 16), (2, 8)), workload(8, (4, 16), (2, 8), greedy=True)
    assert [r.temperature for r in mixed] == [0.0, 0.7] * 4
    assert [r.temperature for r in greedy] == [0.0] * 8
    # The same prompts, lengths and stop strings: only the sampling differs.
    assert [(r.text, r.max_tokens, r.stop) for r in mixed] == [(r.text, r.max_tokens, r.stop) for r in greedy]


def test_serving_ratios_are_medians_of_per_round_ratios_and_the_table_medians_of_rounds():
    from benchmarks.serving import ServingSettings, _figures, _merged

    def run(contender: str, round_: int, tokens_per_s: float, ttft: float) -> dict:
        percentiles = {"p50": ttft, "p99": ttft}
        return {"contender": contender, "clients": 16, "stream": True, "round": round_, "errors": 0,
                "requests_per_s": 1.0, "output_tokens_per_s": tokens_per_s, "ttft_s": percentiles,
                "tpot_s": percentiles, "latency_s": percentiles}

    # Tokens/s per round, ours / theirs: 1.0, 4.0, 0.8 -> median 1.0 (the ratio of the medians: 1.6).
    # TTFT per round, theirs / ours: 2.0, 0.5, 1.5 -> median 1.5 (the ratio of the medians: 1.0).
    ours = [run("templated_llama_openai", r, v, t) for r, v, t in ((0, 100, 1.0), (1, 400, 2.0), (2, 160, 4.0))]
    theirs = [run("transformers_serve", r, v, t) for r, v, t in ((0, 100, 2.0), (1, 100, 1.0), (2, 200, 6.0))]
    figures = {f["figure"]: f for f in _figures(ours + theirs, ServingSettings(clients=(16,)))
               if "streamed" in f["figure"]}
    tokens = figures["16 clients, streamed: output tokens/s, templated-llm serve / transformers serve (Llama)"]
    assert tokens["value"] == pytest.approx(1.0) and tokens["met"] is False
    ttft = figures["16 clients, streamed: time to first token p50, transformers serve / templated-llm serve (Llama)"]
    assert ttft["value"] == pytest.approx(1.5)
    merged = {r["contender"]: r for r in _merged(ours + theirs)}
    assert merged["templated_llama_openai"]["output_tokens_per_s"] == 160
    assert merged["templated_llama_openai"]["ttft_s"]["p50"] == 2.0
    assert merged["templated_llama_openai"]["rounds"] == 3


@pytest.mark.parametrize("page", pages.PAGES, ids=lambda p: p.name)
def test_the_docs_show_the_figures_of_the_reference_results(page):
    # Regenerate with `python -m benchmarks.pages` (a full `python -m benchmarks` run does it).
    text = page.read_text()
    assert "<!-- generated: " in text
    assert text == pages.render(text, json.loads(pages.LATEST.read_text()))


@pytest.mark.skipif(not packing_available(torch.bfloat16), reason="this CPU has no oneDNN bfloat16")
def test_the_linear_benchmark_times_every_variant_at_every_batch_size(tmp_path):
    out = tmp_path / "linear.json"
    linear.main(["--d-model", "64", "--repeats", "2", "--out", str(out)])
    results = json.loads(out.read_text())
    assert [row["batch"] for row in results["rows"]] == list(linear.BATCHES)
    variants = {"float32 nn.Linear", "float32 packed", "bfloat16 nn.Linear", "bfloat16 packed",
                "bfloat16 weight-major"}
    for row in results["rows"]:
        assert row["milliseconds"].keys() == variants and min(row["milliseconds"].values()) > 0
        assert all(len(times) == 2 for times in row["seconds"].values())
        assert row["bf16_weight_major_over_packed"]["median"] > 0
    table = linear.report(results)
    assert "bf16 weight-major / bf16 packed" in table and results["machine"]["cpu_model"] in table


def test_the_decode_attention_benchmark_times_both_ways_on_both_models(tmp_path):
    out = tmp_path / "decode.json"
    decode_attention.main(["--d-model", "64", "--n-layers", "2", "--n-heads", "4", "--rows", "2", "8",
                           "--repeats", "2", "--cache", str(tmp_path), "--out", str(out)])
    results = json.loads(out.read_text())
    cells = {(r["model"], r["rows"], r["lengths"]) for r in results["rows"]}
    assert cells == {(m, n, k) for m in ("mpt", "llama") for n in (2, 8) for k in ("even", "mixed", "short")}
    for row in results["rows"]:
        assert all(len(times) == 2 for times in row["seconds"].values())
        assert min(row["milliseconds"].values()) > 0 and row["per_row_speedup"]["median"] > 0
        # Even rows never go per row; the engine's pick follows the bytes padding would read.
        assert row["padding_bytes"] == 0 or row["lengths"] != "even"
        per_row = row["padding_bytes"] >= row["rows"] * attention._PER_ROW_CALL_BYTES
        assert row["engine_picks"] == ("per row" if per_row else "padded")
    table = decode_attention.report(results)
    assert "per row / padded" in table and results["machine"]["cpu_model"] in table


def test_the_full_size_harness_runs_at_smoke_size(tmp_path):
    # `--size mpt-7b` on a tiny model of the same layout (bf16 .bin shards, 50432-token
    # vocabulary), then the two-dtype section: every figure computed, the CPU recorded.
    subprocess.run(
        [sys.executable, "-m", "benchmarks", "--size", "smoke", "--out", str(tmp_path / "results"),
         "--cache", str(tmp_path / "cache")],
        cwd=REPO, check=True, timeout=1200, capture_output=True,
        env=repo_env(),
    )
    results = json.loads((tmp_path / "results" / "full-size-smoke.json").read_text())
    assert results["machine"]["cpu_model"] and results["memory_bandwidth"]["bytes_per_s"] > 0
    layout, dtypes = results["sections"]
    assert len(list((tmp_path / "cache" / layout["snapshot"]).glob("pytorch_model-*-of-*.bin"))) == 2
    assert layout["auto"]["chose"] in ("bfloat16", "float32") and layout["auto"]["reason"]
    assert set(dtypes["contenders"]) == {"templated_auto", "templated_float32", "plain_float32",
                                         f"plain_{dtypes['auto']['chose']}"}
    # Two rounds of logging against a copy: the second deletes the first's logged files first,
    # and a failure there fails the run.
    assert len(layout["log"]["log_seconds"]) == len(layout["log"]["copy_seconds"]) == 2
    for section in (layout, dtypes):
        assert section["figures"]["loads_during_log"] == 0
        for contender in section["contenders"].values():
            assert contender["load_seconds"] > 0 and contender["prefill"]["tokens_per_s"] > 0
    table = (tmp_path / "results" / "full-size-smoke.md").read_text()
    assert bf16_flags(results["machine"]["cpu_flags"]) in table and "bandwidth limit" in table


def test_short_runs_repeat_within_a_round_and_are_timed_per_call():
    calls = {"short": 0, "long": 0}

    def run(name: str, seconds: float):
        def call() -> None:
            calls[name] += 1
            time.sleep(seconds)
        return call

    times = interleaved_seconds({"short": run("short", 0.001), "long": run("long", 0.03)}, repeats=3,
                                min_round_seconds=0.02)
    assert calls["long"] == 1 + 3  # the warm-up, then one call per round: it lasts the round alone
    assert calls["short"] >= 1 + 3 * 5  # repeated until a round lasts about 20 ms
    assert all(0.001 <= t < 0.015 for t in times["short"])  # a call's time, not a round's (>= 20 ms)
    assert all(t >= 0.03 for t in times["long"])
