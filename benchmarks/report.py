"""Writes a run's results: latest.json, a Markdown table and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# id, what it measures, target comparison, target value.
FIGURES = (
    ("tokens_per_s_vs_tutorial", "tokens/s, TemplatedLLM / tutorial pyfunc", ">=", 10.0),
    ("tokens_per_s_vs_plain", "tokens/s, TemplatedLLM / plain transformers", ">=", 1.3),
    ("tokens_per_s_vs_transformers_flavor", "tokens/s, TemplatedLLM / MLflow transformers flavor", ">=", 2.0),
    ("one_prompt_predict_over_generate", "one prompt: TemplatedLLM predict time / plain generate time", "<=", 1.05),
    ("prefill_sdpa_over_eager", "prefill speed-up, sdpa over eager", ">=", 2.0),
    ("log_over_copy", "log_llm wall time / copy of the snapshot directory", "<=", 1.5),
    ("loads_during_log", "model loads during log_llm", "<=", 0),
    ("load_peak_rss_over_weights", "peak RSS of load_model / bytes of the weights", "<=", 1.3),
    ("served_rps_vs_transformers_flavor", "served requests/s, TemplatedLLM / transformers flavor", ">=", 1.5),
)
FIGURE_IDS = tuple(f[0] for f in FIGURES)


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


def _format(value: float | None) -> str:
    if value is None:
        return "skipped"
    return f"{value:.0f}" if value == int(value) and abs(value) < 1e6 else f"{value:.3g}"


def markdown(results: dict[str, Any]) -> str:
    lines = ["| figure | measured | target | met | note |", "| --- | --- | --- | --- | --- |"]
    for key in FIGURE_IDS:
        f = results["figures"][key]
        met = {True: "yes", False: "**no**", None: "n/a"}[f["met"]]
        lines.append(f"| {f['description']} | {_format(f['value'])} | {f['target']} | {met} | {f['note']} |")
    lines += ["", "| contender | tokens/s | prompts timed | seconds (median) |", "| --- | --- | --- | --- |"]
    for c in results["contenders"].values():
        lines.append(f"| {c['label']} | {c['tokens_per_s']:.1f} | {c['prompts']} | {c['seconds']:.2f} |")
    s = results["settings"]
    lines += ["", f"Snapshot: {results['snapshot']['parameters'] / 1e6:.1f}M parameters, "
              f"{results['snapshot']['weight_bytes'] / 1e6:.0f} MB of weights; {s['prompts']} prompts x "
              f"{s['new_tokens']} new tokens, median of {s['repeats']} after a warm-up; "
              f"{results['machine']['cpus']} CPUs, torch {results['machine']['torch']}, "
              f"{results['machine']['date']}. The contenders take turns in every round; a ratio is the "
              "median of the per-round ratios, so it need not equal the ratio of two medians above."]
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.3]})
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "latest.md").write_text(markdown(results))
    chart(results, out / "latest.png")
