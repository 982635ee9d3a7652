"""Writes a run's results: latest.json, a Markdown table and a PNG chart."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

# id, what it measures, target comparison, target value. "TemplatedLLM" is the model as
# log_llm logs it by default (attention "auto"); the other backends are in the notes.
FIGURES = (
    ("tokens_per_s_vs_tutorial", "tokens/s, TemplatedLLM / tutorial pyfunc", ">=", 10.0),
    ("tokens_per_s_vs_plain", "tokens/s, TemplatedLLM / plain transformers", ">=", 1.3),
    ("tokens_per_s_vs_transformers_flavor",
     "tokens/s, TemplatedLLM / MLflow transformers flavor (cache on, batched)", ">=", 2.0),
    ("tokens_per_s_vs_transformers_flavor_as_logged",
     "tokens/s, TemplatedLLM / MLflow transformers flavor (as logged)", ">=", 2.0),
    ("overhead_predict_over_generate",
     "one prompt: TemplatedLLM predict time / its loaded model's own generate time", "<=", 1.05),
    ("prefill_sdpa_over_eager", "prefill speed-up, sdpa over eager: forward pass", ">=", 2.0),
    ("prefill_end_to_end_sdpa_over_eager", "prefill speed-up, sdpa over eager: predict end to end", ">=", 2.0),
    ("prefill_end_to_end_sdpa_over_eager_bf16",
     "prefill speed-up, sdpa over eager: predict end to end, bf16 checkpoint", ">=", 2.0),
    ("log_over_copy", "log_llm wall time / copy of the snapshot directory", "<=", 1.5),
    ("loads_during_log", "model loads during log_llm", "<=", 0),
    ("load_peak_rss_over_weights",
     "peak RSS of load_model beyond the engine's KV cache / bytes of the weights", "<=", 1.3),
    ("served_rps_vs_transformers_flavor",
     "served requests/s, TemplatedLLM / transformers flavor (cache on)", ">=", 1.5),
    ("served_rps_vs_transformers_flavor_as_logged",
     "served requests/s, TemplatedLLM / transformers flavor (as logged)", ">=", 1.5),
)
FIGURE_IDS = tuple(f[0] for f in FIGURES)
# CPU flags naming the vector and matrix units the matmul and attention kernels can use.
_KERNEL_FLAGS = ("avx2", "avx512", "amx", "fma")
_TOP_OPS = 5  # operators listed per backend in the prefill profile


def figure(value: float | None, note: str = "") -> dict[str, Any]:
    return {"value": value, "note": note}


def _met(value: float | None, comparison: str, target: float) -> bool | None:
    if value is None:
        return None
    return value >= target if comparison == ">=" else value <= target


def finish(results: dict[str, Any]) -> dict[str, Any]:
    """Add each figure's description, target and whether it was met."""
    for key, description, comparison, target in FIGURES:
        entry = results["figures"][key]
        entry.update(description=description, target=f"{comparison} {target:g}",
                     met=_met(entry["value"], comparison, target))
    return results


def _format(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "skipped"
    return f"{value:.0f}" if value == int(value) and abs(value) < 1e6 else f"{value:.{digits}g}"


def _measured(figure: dict[str, Any]) -> str:
    """The value, with more digits where three would round a miss onto its target (1.4996: 1.5)."""
    shown, target = _format(figure["value"]), figure["target"].split()[-1]
    return _format(figure["value"], 5) if figure["met"] is False and shown == target else shown


def _figures_table(results: dict[str, Any]) -> list[str]:
    lines = ["| figure | measured | target | met | note |", "| --- | --- | --- | --- | --- |"]
    for key in FIGURE_IDS:
        f = results["figures"][key]
        met = {True: "yes", False: "**no**", None: "n/a"}[f["met"]]
        lines.append(f"| {f['description']} | {_measured(f)} | {f['target']} | {met} | {f['note']} |")
    return lines


def _contenders_table(results: dict[str, Any]) -> list[str]:
    lines = ["| contender | tokens/s | prompts timed | seconds (median) | first call, untimed (s) |",
             "| --- | --- | --- | --- | --- |"]
    for c in results["contenders"].values():
        lines.append(f"| {c['label']} | {c['tokens_per_s']:.1f} | {c['prompts']} | {c['seconds']:.2f} "
                     f"| {c['warm_up_seconds']:.2f} |")
    return lines


def _details(results: dict[str, Any]) -> list[str]:
    d, contenders = results["details"], results["contenders"]
    overhead = d["overhead"]
    lines = [f"- One prompt, {results['settings']['new_tokens']} new tokens: `predict` "
             f"{overhead['predict_seconds']:.3f} s, the same model's `generate` {overhead['generate_seconds']:.3f} s "
             "(medians)."]
    if "prefill_seconds" in d:
        forward, end_to_end = d["prefill_seconds"], d["prefill_end_to_end"]
        lines.append(
            f"- Prefill, medians: forward pass of {results['settings']['prefill_tokens']} tokens "
            + ", ".join(f"{b} {statistics.median(t):.3f} s" for b, t in forward.items())
            + f"; `predict` of a {end_to_end['prompt_tokens']}-token prompt, max_tokens 1, "
            + ", ".join(f"{b} {statistics.median(t):.3f} s" for b, t in end_to_end["seconds"].items()) + ".")
        lines.append("- Where that `predict` spends its CPU time (torch profiler, self time, largest "
                     "operators): " + _shares(end_to_end) + ".")
    if d.get("prefill_end_to_end_bf16"):
        bf16 = d["prefill_end_to_end_bf16"]
        lines.append("- The same `predict` on the weights stored in bfloat16 (auto runs them in bfloat16 "
                     "here), medians: " + ", ".join(f"{b} {statistics.median(t):.3f} s"
                                                    for b, t in bf16["seconds"].items())
                     + "; its CPU time: " + _shares(bf16) + ".")
    served = ", ".join(f"{contenders[name]['label']} {s['requests_per_s']:.2f} (first round, untimed: "
                       f"{s['warm_up_seconds']:.2f} s)" for name, s in d["served"].items())
    lines.append(f"- Served requests/s: {served}.")
    if results["templated_backends_unavailable"]:
        lines.append("- Attention backends not run here: " + "; ".join(
            f"{b}: {why}" for b, why in results["templated_backends_unavailable"].items()))
    return lines


def _shares(end_to_end: dict[str, Any]) -> str:
    return "; ".join(f"{b}: " + ", ".join(f"`{op}` {share:.0%}" for op, share in list(shares.items())[:_TOP_OPS])
                     for b, shares in end_to_end["cpu_time_shares"].items())


def _machine(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["settings"]
    flags = [f for f in m["cpu_flags"] if f.startswith(_KERNEL_FLAGS)]
    return (f"Snapshot: {results['snapshot']['parameters'] / 1e6:.1f}M parameters, "
            f"{results['snapshot']['weight_bytes'] / 1e6:.0f} MB of weights; {s['prompts']} prompts x "
            f"{s['new_tokens']} new tokens, median of {s['repeats']} after a warm-up call each. "
            f"{m['cpu_model']}, {m['cpus']} CPUs" + (f" (flags {' '.join(flags)})" if flags else "")
            + f", {m['torch_threads']} torch thread(s) per process, load average {m['load_average'][0]:.2f} at the start and {m['load_average_end'][0]:.2f} "
            f"at the end. {m['note'] + ' ' if m['note'] else ''}torch {m['torch']}, transformers "
            f"{m['transformers']}, mlflow {m['mlflow']}, {m['date']}. TemplatedLLM traces its predicts: "
            f"{'yes' if s.get('traced') else 'no (as no other contender traces; --traced turns it on)'}. "
            "The contenders take turns in every "
            "round; a ratio is the median of the per-round ratios, so it need not equal the ratio of two "
            "medians above.")


def markdown(results: dict[str, Any]) -> str:
    lines = [*_figures_table(results), "", *_contenders_table(results), "", *_details(results), "",
             _machine(results)]
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.4), gridspec_kw={"width_ratios": [1, 1.2]},
                                   layout="constrained")
    contenders = list(results["contenders"].values())
    left.barh([c["label"] for c in contenders], [c["tokens_per_s"] for c in contenders], color="#4c72b0")
    left.set_xscale("log")
    left.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a log axis overlap
    left.set_xlabel("tokens/s (log scale)")
    left.invert_yaxis()
    left.set_title("Generation throughput, same snapshot, greedy")

    # Every figure as "how far from its target": > 1 means the target is met.
    shown = [(k, d, c, t) for k, d, c, t in FIGURES
             if results["figures"][k]["value"] is not None and t != 0]
    scores = []
    for key, _, comparison, target in shown:
        value = results["figures"][key]["value"]
        scores.append(value / target if comparison == ">=" else target / max(value, 1e-9))
    right.barh([results["figures"][k]["description"] for k, *_ in shown], scores,
               color=["#55a868" if s >= 1 else "#c44e52" for s in scores])
    right.axvline(1.0, color="black", linewidth=1)
    right.set_xscale("log")
    right.set_xlabel("measured / target (>= 1: target met; log scale)")
    right.invert_yaxis()
    right.tick_params(axis="y", labelsize=7)
    right.set_title("Figures against their targets")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "latest.md").write_text(markdown(results))
    chart(results, out / "latest.png")
