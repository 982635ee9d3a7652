"""One benchmark run: build the contenders, measure every figure, return the results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import contenders as c
from benchmarks import figures as f
from benchmarks.measure import median_ratio, weight_bytes
from benchmarks.report import figure, finish
from benchmarks.settings import Settings
from benchmarks.snapshot import parameters, snapshot

MPT_7B_BYTES = 13.3e9


def _say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def run(settings: Settings, cache: Path) -> dict[str, Any]:
    path = snapshot(settings, cache)
    weights = weight_bytes(path)
    _say(f"snapshot {path.name}: {parameters(path) / 1e6:.1f}M parameters")
    results: dict[str, Any] = {
        "settings": settings.as_dict(), "machine": f.machine(),
        "snapshot": {"parameters": parameters(path), "weight_bytes": weights},
        "contenders": {}, "templated_backends_unavailable": {}, "figures": {}, "details": {},
    }
    figures, details = results["figures"], results["details"]

    _say("logging and loading the contenders")
    templated, unavailable = c.templated(path)
    results["templated_backends_unavailable"] = unavailable
    plain = c.plain(path)
    everyone = [c.tutorial(path), plain, c.transformers_flavor(path), *templated]

    _say("throughput: every contender, taking turns")
    for name, measured in f.throughput(everyone, settings).items():
        results["contenders"][name] = {"label": next(x.label for x in everyone if x.name == name), **measured}
    measured = results["contenders"]
    best = max(templated, key=lambda t: measured[t.name]["tokens_per_s"])
    backend = best.name.removeprefix("templated_")
    for key, other in (("tokens_per_s_vs_tutorial", "tutorial"), ("tokens_per_s_vs_plain", "plain"),
                       ("tokens_per_s_vs_transformers_flavor", "transformers_flavor")):
        details[key] = {t.name: f.throughput_ratio(measured[t.name], measured[other]) for t in templated}
        figures[key] = figure(details[key][best.name], f"TemplatedLLM with {backend} attention")
    generated = f.new_tokens_generated(plain, settings)
    details["new_tokens_generated"] = {"generated": generated,
                                      "requested": settings.prompts * settings.new_tokens}

    _say("one prompt")
    details["one_prompt"] = f.one_prompt(best, plain, settings)
    figures["one_prompt_predict_over_generate"] = figure(details["one_prompt"]["ratio"], f"{backend} attention")

    _say("prefill")
    details["prefill_seconds"] = f.prefill(templated, settings)
    if {"sdpa", "eager"} <= details["prefill_seconds"].keys():
        seconds = details["prefill_seconds"]
        figures["prefill_sdpa_over_eager"] = figure(median_ratio(seconds["eager"], seconds["sdpa"]),
                                                    f"{settings.prefill_tokens}-token prompt, one forward pass")
    else:
        figures["prefill_sdpa_over_eager"] = figure(
            None, "sdpa is not available for this model here: " + unavailable.get("sdpa", "not logged"))

    _say("log_llm against a copy")
    details["log"] = f.log_versus_copy(path, settings)
    log = details["log"]
    # Logging costs a copy plus a fixed overhead (MLflow's metadata, requirements, the store);
    # the projection scales the copy to MPT-7B-instruct's 13.3 GB of weights.
    copy_7b = log["copy_seconds"] * MPT_7B_BYTES / weights
    log["projected_mpt_7b_ratio"] = (log["log_seconds"] - log["copy_seconds"] + copy_7b) / copy_7b
    figures["log_over_copy"] = figure(
        log["ratio"], f"{weights / 1e6:.0f} MB snapshot: {log['log_seconds']:.2f} s against "
        f"{log['copy_seconds']:.2f} s (copying at {weights / log['copy_seconds'] / 1e6:.0f} MB/s); "
        f"projected for MPT-7B's 13.3 GB: {log['projected_mpt_7b_ratio']:.2f}")
    figures["loads_during_log"] = figure(f.loads_during_log(path), "from_pretrained and load_context calls")

    _say("load memory, each in a fresh process")
    details["load_memory"] = {}
    for contender in (best, everyone[0], everyone[2]):
        details["load_memory"][contender.name] = f.load_memory(contender, path, settings.serve_tokens)
    memory = details["load_memory"][best.name]
    first = memory["first_load_in_process"]["load_and_predict_peak_bytes"] / weights
    figures["load_peak_rss_over_weights"] = figure(
        memory["load_and_predict_ratio"],
        f"load and a first predict; load alone {memory['load_ratio']:.2f}; {first:.2f} for a "
        "process's first model, with its imports")

    _say("served requests/s")
    details["served"] = served = f.served_requests_per_s([best, everyone[2]], settings)
    figures["served_rps_vs_transformers_flavor"] = figure(
        median_ratio(served["transformers_flavor"]["all_seconds"], served[best.name]["all_seconds"]),
        f"{settings.clients} clients, {settings.serve_tokens} new tokens per request, one server worker")
    return finish(results)
