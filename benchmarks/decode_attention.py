"""Decode-step benchmark: the engine's attention per row against one padded call.

One engine decode step (``ModelAdapter.forward`` on the slot cache, linear layers packed as at
load) of the benchmark's MPT and Llama, at 4 to 64 rows, with every row at the same length,
with lengths drawn from 16-700 keys (mixed traffic) and from 16-128 (short turns), each way: one SDPA call over the rows
padded to the longest, and a call per row over its own keys (``templated_llm.engine.attention``).
The two take turns in every round (``--repeats`` rounds after a warm-up); a speed-up is the
median of the rounds' ratios. Also says which the engine picks for each step. Prints one table
and the CPU it ran on; writes the same, with every round's time, as JSON with ``--out``.

Run: ``python -m benchmarks.decode_attention [--dtype bfloat16 --repeats 20 --out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.figures import machine
from benchmarks.measure import bf16_flags, interleaved_seconds, speedup
from templated_llm.engine import attention
from templated_llm.engine.cache import SlotCache, StepBatch

ROWS = (4, 8, 16, 32, 64)
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "benchmarks"
LONGEST = 700
# How many keys each row holds: all alike, or mixed as under real traffic.
LENGTHS: dict[str, Callable[[int, random.Random], list[int]]] = {
    "even": lambda rows, rng: [400] * rows,
    "mixed": lambda rows, rng: [rng.randint(16, LONGEST) for _ in range(rows)],
    # Short prompts and answers (chat turns): little padding, and a call per row costs more.
    "short": lambda rows, rng: [rng.randint(16, 128) for _ in range(rows)],
}


def _adapter(architecture: str, snapshot: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from templated_llm.engine import HuggingFaceAdapter
    from templated_llm.runtime.packed_linear import pack_linear_layers

    if architecture == "mpt":
        from templated_llm_mpt.attention import install_attention
        from templated_llm_mpt.engine import MptAdapter

        model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=dtype).eval()
        install_attention(model, "sdpa")
        pack_linear_layers(model)
        return MptAdapter(model, "sdpa")
    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=dtype, attn_implementation="sdpa").eval()
    pack_linear_layers(model)
    return HuggingFaceAdapter(model)


def _step(adapter, batch: StepBatch, cache: SlotCache, call_bytes: float) -> Callable[[], None]:
    def run() -> None:
        # The threshold decides every step it sees: inf never runs per row, 0 always does.
        attention._PER_ROW_CALL_BYTES, saved = call_bytes, attention._PER_ROW_CALL_BYTES
        try:
            with torch.inference_mode():
                adapter.forward(batch, cache)
        finally:
            attention._PER_ROW_CALL_BYTES = saved

    return run


def measure(snapshots: dict[str, Path], dtype: torch.dtype, repeats: int, rows: tuple[int, ...]) -> list[dict]:
    results = []
    for architecture, snapshot in snapshots.items():
        adapter = _adapter(architecture, snapshot, dtype)
        cache = SlotCache(adapter.layers, max(rows), adapter.kv_heads, LONGEST, adapter.head_dim,
                          dtype, "cpu")
        cache.k.normal_()
        cache.v.normal_()
        rng = random.Random(0)
        for count in rows:
            for name, lengths in LENGTHS.items():
                keys = lengths(count, rng)
                batch = StepBatch(torch.zeros(count, 1, dtype=torch.long), list(range(count)),
                                  [n - 1 for n in keys], [1] * count)
                times = interleaved_seconds({
                    "padded": _step(adapter, batch, cache, float("inf")),
                    "per row": _step(adapter, batch, cache, 0),
                }, repeats)
                results.append({
                    "model": architecture, "rows": count, "lengths": name,
                    "keys_read_over_needed": count * max(keys) / sum(keys),
                    # What one padded call reads past the rows' own keys, per layer.
                    "padding_bytes": (count * max(keys) - sum(keys)) * adapter.key_bytes,
                    "milliseconds": {k: min(t) * 1e3 for k, t in times.items()},
                    "per_row_speedup": speedup(times["padded"], times["per row"]),
                    "engine_picks": "per row" if attention.per_row_keys(batch, key_bytes=adapter.key_bytes) else "padded",
                    "seconds": times,
                })
    return results


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"One decode step in {results['dtype']}: milliseconds (fastest round) padded to the longest "
        "row and per row, the speed-up of per row (median of the rounds' ratios, interquartile "
        "range), and what the engine runs:", "",
        "| model | rows | lengths | keys read / needed, padded | padded (ms) | per row (ms) "
        "| per row / padded | engine runs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        s = row["per_row_speedup"]
        lines.append(
            f"| {row['model']} | {row['rows']} | {row['lengths']} | {row['keys_read_over_needed']:.2f} "
            f"| {row['milliseconds']['padded']:.1f} | {row['milliseconds']['per row']:.1f} "
            f"| {s['median']:.2f}x ({s['q1']:.2f}-{s['q3']:.2f}) | {row['engine_picks']} |")
    lines += ["", f"CPU: {m['cpu_model']} (flags: {bf16_flags(m['cpu_flags'])}); {m['torch_threads']} "
              f"torch thread(s); torch {m['torch']}; {m['date']}; load average {m['load_average'][0]:.1f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_attention",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="rows per step")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the snapshots are built")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    from benchmarks.snapshot import tiny_snapshots

    # The mixed benchmark's snapshots (found in the cache once it has run).
    snapshots = tiny_snapshots(args.cache, args.d_model, args.n_layers, args.n_heads)
    results = {"dtype": args.dtype, "machine": machine(""),
               "rows": measure(snapshots, getattr(torch, args.dtype), args.repeats, tuple(args.rows))}
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
