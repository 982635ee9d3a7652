"""One benchmark run: build the contenders, measure every figure, return the results."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from benchmarks import contenders as c
from benchmarks import figures as f
from benchmarks.measure import median_ratio, weight_bytes
from benchmarks.report import figure, finish
from benchmarks.settings import Settings
from benchmarks.snapshot import parameters, snapshot
from templated_llm.runtime.device import AUTO, choose_dtype, default_device

MPT_7B_BYTES = 13.3e9


def _say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def _backend(contender: c.Contender) -> str:
    return contender.name.removeprefix("templated_")


def _beside(values: dict[str, float], default: c.Contender) -> str:
    """The headline's note: TemplatedLLM as logged by default, the other backends beside it."""
    others = ", ".join(f"{name.removeprefix('templated_')} {value:.3g}"
                       for name, value in values.items() if name != default.name)
    return f"default attention (auto: {_backend(default)})" + (f"; {others}" if others else "")


def _prefill_bf16(settings: Settings, cache: Path, backends: dict[str, c.Contender]
                  ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The end-to-end prefill figure on a bfloat16 checkpoint, where ``auto`` runs it in
    bfloat16 (a CPU with bf16 instructions): the float32 linear layers that bound the
    float32 figure (the same in both backends) take a fraction of the time there."""
    if len(backends) != 2:
        return None, figure(None, "sdpa or eager is not available for this model here")
    path = snapshot(settings, cache, dtype="bfloat16")
    choice = choose_dtype(AUTO, default_device(), path)
    if choice.name != "bfloat16":
        return None, figure(None, f"auto runs a bfloat16 checkpoint in {choice.name} here: {choice.reason}")
    bf16 = {backend: c.templated_with(path, backend, "4. TemplatedLLM ({}), bf16 checkpoint")
            for backend in backends}
    measured = f.prefill_end_to_end(bf16, settings)
    return measured, figure(
        median_ratio(measured["seconds"]["eager"], measured["seconds"]["sdpa"]),
        f"{measured['prompt_tokens']}-token prompt through predict, max_tokens 1; auto: bfloat16 "
        f"({choice.reason})")


def run(settings: Settings, cache: Path, note: str = "") -> dict[str, Any]:
    path = snapshot(settings, cache)
    weights = weight_bytes(path)
    _say(f"snapshot {path.name}: {parameters(path) / 1e6:.1f}M parameters")
    results: dict[str, Any] = {
        "settings": settings.as_dict(), "machine": f.machine(note),
        "snapshot": {"parameters": parameters(path), "weight_bytes": weights},
        "contenders": {}, "templated_backends_unavailable": {}, "figures": {}, "details": {},
    }
    figures, details = results["figures"], results["details"]

    _say("logging and loading the contenders")
    default, others, results["templated_backends_unavailable"] = c.templated(path)
    templated = [default, *others]
    tutorial, plain = c.tutorial(path), c.plain(path)
    flavor, flavor_fair = c.transformers_flavor(path, fair=False), c.transformers_flavor(path, fair=True)
    everyone = [tutorial, plain, flavor, flavor_fair, *templated]
    results["headline"] = default.name

    _say("throughput: every contender, taking turns")
    for name, measured in f.throughput(everyone, settings).items():
        results["contenders"][name] = {"label": next(x.label for x in everyone if x.name == name), **measured}
    measured = results["contenders"]
    for key, other in (("tokens_per_s_vs_tutorial", tutorial), ("tokens_per_s_vs_plain", plain),
                       ("tokens_per_s_vs_transformers_flavor", flavor_fair),
                       ("tokens_per_s_vs_transformers_flavor_as_logged", flavor)):
        details[key] = {t.name: f.throughput_ratio(measured[t.name], measured[other.name]) for t in templated}
        figures[key] = figure(details[key][default.name], _beside(details[key], default))

    _say("overhead: predict against the same model's own generate")
    details["overhead"] = f.overhead(default, settings)
    figures["overhead_predict_over_generate"] = figure(
        details["overhead"]["ratio"], f"{settings.new_tokens} new tokens; {_backend(default)} attention")

    _say("prefill: one forward pass, and predict end to end")
    backends = {_backend(t): t for t in templated if _backend(t) in ("eager", "sdpa")}
    if len(backends) == 2:
        details["prefill_seconds"] = forward = f.prefill_forward(backends, settings)
        details["prefill_end_to_end"] = end_to_end = f.prefill_end_to_end(backends, settings)
        seconds = end_to_end["seconds"]
        figures["prefill_sdpa_over_eager"] = figure(
            median_ratio(forward["eager"], forward["sdpa"]),
            f"{settings.prefill_tokens}-token prompt, the model's forward pass alone")
        figures["prefill_end_to_end_sdpa_over_eager"] = figure(
            median_ratio(seconds["eager"], seconds["sdpa"]),
            f"{end_to_end['prompt_tokens']}-token prompt through predict, max_tokens 1")
    else:
        why = "sdpa or eager is not available for this model here: " + str(results["templated_backends_unavailable"])
        figures["prefill_sdpa_over_eager"] = figures["prefill_end_to_end_sdpa_over_eager"] = figure(None, why)
    _say("prefill end to end: the same weights stored in bfloat16, as mpt-7b-instruct ships")
    details["prefill_end_to_end_bf16"], figures["prefill_end_to_end_sdpa_over_eager_bf16"] = \
        _prefill_bf16(settings, cache, backends)

    _say("log_llm against a copy")
    details["log"] = log = f.log_versus_copy(path, settings)
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
    details["load_memory"] = {x.name: f.load_memory(x, path, settings.serve_tokens)
                              for x in (default, tutorial, flavor_fair)}
    memory = details["load_memory"][default.name]
    # The engine allocates its KV cache at load, a budget of its own: the figure is the rest.
    cache = memory["engine_cache_bytes"]
    first = (memory["first_load_in_process"]["load_and_predict_peak_bytes"] - cache) / weights
    figures["load_peak_rss_over_weights"] = figure(
        (memory["load_and_predict_peak_bytes"] - cache) / weights,
        f"load and a first predict; load alone {(memory['load_peak_bytes'] - cache) / weights:.2f}; "
        f"{first:.2f} for a process's first model, with its imports; the engine's KV cache beside "
        f"it: {cache / 1e9:.2f} GB ({cache / weights:.1f} times the weights)")

    _say("served requests/s")
    details["served"] = served = f.served_requests_per_s([default, flavor_fair, flavor], settings)
    for key, other in (("served_rps_vs_transformers_flavor", flavor_fair),
                       ("served_rps_vs_transformers_flavor_as_logged", flavor)):
        figures[key] = figure(
            median_ratio(served[other.name]["all_seconds"], served[default.name]["all_seconds"]),
            f"{settings.clients} clients, {settings.serve_tokens} new tokens per request, one server worker")
    results["machine"]["load_average_end"] = list(os.getloadavg())
    return finish(results)
