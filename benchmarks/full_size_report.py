"""The Markdown of a ``python -m benchmarks --size`` run: the machine, then a table per section."""

from __future__ import annotations

from typing import Any

from benchmarks.measure import bf16_flags

_LABELS = {"templated": "TemplatedLLM", "plain": "plain transformers"}


def _shown(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _met(value: float | None, comparison: str, target: float | None) -> str:
    if target is None or value is None:
        return "-"
    return "yes" if (value >= target if comparison == ">=" else value <= target) else "**no**"


def _figure_rows(section: dict[str, Any], targets: dict[str, float]) -> list[str]:
    figures, batch = section["figures"], section["workload"]["batches"][-1]
    rows = [("log_llm wall time / copy of the snapshot", figures["log_over_copy"], ".2f", "<=",
             targets["log_over_copy"]),
            ("model loads during log_llm", figures["loads_during_log"], "d", "<=", 0)]
    for requested in section["dtypes"]:
        entry = figures[requested]
        who = f"TemplatedLLM ({requested}: {entry['dtype']})"
        rows += [
            (f"{who}: peak RSS of load (less the engine's KV cache) / weight bytes",
             entry["load_peak_rss_over_weights"], ".3f", "<=",
             targets["load_peak_rss_over_weights"]),
            (f"{who}: batch-1 decode / bandwidth limit ({entry['batch_1_limit_tokens_per_s']:.1f} tokens/s)",
             entry["batch_1_share_of_limit"], ".0%", ">=", targets["batch_1_share_of_limit"]),
            (f"{who} / plain transformers, decode at batch {batch}", entry["templated_over_plain_last_batch"],
             ".2f", ">=", targets["templated_over_plain_batch_16_bf16"] if entry["dtype"] == "bfloat16" else None),
        ]
    if "bf16_over_float32_last_batch" in figures:
        rows.append((f"TemplatedLLM bf16 / float32, decode at batch {batch}",
                     figures["bf16_over_float32_last_batch"], ".2f", ">=", targets["bf16_over_float32_batch_16"]))
    lines = ["| figure | measured | target | met |", "| --- | --- | --- | --- |"]
    for name, value, spec, comparison, target in rows:
        lines.append(f"| {name} | {_shown(value, spec)} | "
                     f"{f'{comparison} {target:g}' if target is not None else '-'} | "
                     f"{_met(value, comparison, target)} |")
    return lines


def _contender_rows(section: dict[str, Any]) -> list[str]:
    batches = section["workload"]["batches"]
    lines = ["| contender | dtype | load (s) | peak RSS / weights | "
             + " | ".join(f"decode tokens/s, batch {b}" for b in batches)
             + f" | prefill tokens/s ({section['workload']['prefill_tokens']} tokens) |",
             "| --- " * (5 + len(batches)) + "|"]
    for name, c in section["contenders"].items():
        kind, requested = name.split("_", 1)
        label = f"{_LABELS[kind]} ({requested})" if kind == "templated" else _LABELS[kind]
        decode = " | ".join(_shown(c[f"decode_batch_{b}"]["tokens_per_s"], ".1f") for b in batches)
        lines.append(f"| {label} | {c['dtype']} | {c['load_seconds']:.1f} | "
                     f"{c['load_peak_rss_over_weights']:.3f} | {decode} | {c['prefill']['tokens_per_s']:.0f} |")
    return lines


def markdown(results: dict[str, Any], heading: str = "#") -> str:
    """The run as Markdown: its title at ``heading``'s level (``""``: no title), each section's
    one level below."""
    m, bandwidth = results["machine"], results["memory_bandwidth"]
    title = [f"{heading} `python -m benchmarks --size {results['size']}`", ""] if heading else []
    lines = [
        *title,
        f"CPU: {m['cpu_model']} (flags: {bf16_flags(m['cpu_flags'])}); "
        f"{m['cpus']} CPUs, {m['torch_threads']} torch threads; torch {m['torch']}, transformers "
        f"{m['transformers']}; {m['date']}; load average {', '.join(f'{x:.1f}' for x in m['load_average'])}"
        + ("" if "traced" not in results else
           f"; TemplatedLLM {'traced' if results['traced'] else 'untraced, as plain transformers'}") + ".",
        "",
        f"Memory read bandwidth: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s (sum of a "
        f"{bandwidth['tensor_bytes'] / 2**30:.1f} GiB float32 tensor, the fastest of "
        f"{len(bandwidth['seconds'])}, with the contenders' threads). Batch-1 decode reads every "
        "weight once per token, so its limit is bandwidth / weight bytes.",
    ]
    for section in results["sections"]:
        verdicts = "; ".join(f"{dtype}: {verdict}" for dtype, verdict in section["memory_check"].items())
        lines += [
            "", f"{heading or '####'}{'#' if heading else ''} {section['title']}", "",
            f"{section['parameters'] / 1e6:,.1f}M parameters; `auto` chose **{section['auto']['chose']}** "
            f"({section['auto']['reason']}). Memory check on this machine: {verdicts}.", "",
            *_contender_rows(section), "", *_figure_rows(section, results["targets"]),
        ]
    workload = results["sections"][0]["workload"]
    lines += ["", f"Decode tokens/s: batch x (steps generating {workload['new_tokens']} tokens - steps "
              "generating 1) / (time of the first - time of the second), so prefill cancels out; medians "
              "of the rounds after a warm-up, the contenders of a process taking turns. Prefill: one "
              "forward pass. Peak RSS: VmHWM over the load, after a small model's load paid the "
              "process's one-off imports, less the KV cache the engine allocates at load (one slot "
              "per row of the largest batch)."]
    return "\n".join(lines) + "\n"
