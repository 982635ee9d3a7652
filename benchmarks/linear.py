"""Linear-layer benchmark: packed (oneDNN) against ``nn.Linear``, in float32 and bfloat16, and
bfloat16 run weight-major.

For every batch size from 1 to 64 rows, times the four matmuls of one MPT block (Wqkv, out_proj,
up_proj, down_proj) at ``--d-model``, each way, the variants taking turns in every round
(``--repeats`` rounds after a warm-up). Times are the fastest round: on a shared machine other
processes' use of the memory bus makes a memory-bound matmul up to 2x slower at random. Speed-ups
are the median of the per-round ratios, with their interquartile range: the two runs of a round
are adjacent in time and see the same load. Prints one table and the CPU it ran on; writes the
same, with every round's time, as JSON with ``--out``.

Run: ``python -m benchmarks.linear [--d-model 4096 --threads 1 --repeats 15 --out FILE]``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.figures import machine
from benchmarks.measure import bf16_flags, interleaved_seconds, speedup
from templated_llm.runtime.packed_linear import PackedLinear, WeightMajorLinear

BATCHES = (1, 2, 3, 4, 8, 16, 32, 64)
# A block at d_model 512 takes well under a millisecond: such runs repeat within a round.
MIN_ROUND_SECONDS = 0.02
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _block(d_model: int, dtype: torch.dtype) -> list[nn.Linear]:
    """The linear layers of one MPT block (no biases, as mpt-7b-instruct), random weights."""
    shapes = ((d_model, 3 * d_model), (d_model, d_model), (d_model, 4 * d_model), (4 * d_model, d_model))
    return [nn.Linear(i, o, bias=False, dtype=dtype).eval() for i, o in shapes]


def _weight_major(layer: nn.Linear) -> WeightMajorLinear:
    """The layer run weight-major, reading the same weight tensor."""
    twin = WeightMajorLinear(layer.in_features, layer.out_features, bias=False, device="meta",
                             dtype=layer.weight.dtype)
    twin.weight = layer.weight
    return twin


def _run(layers: list[nn.Module], inputs: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            for layer, x in zip(layers, inputs):
                layer(x)

    return run


def measure(d_model: int, repeats: int) -> list[dict[str, Any]]:
    """Milliseconds of one block's matmuls per batch size, for each dtype, packed and not, and
    bfloat16 weight-major."""
    torch.manual_seed(0)
    blocks = {}
    for name, dtype in DTYPES.items():
        plain = _block(d_model, dtype)
        blocks[name] = (plain, [PackedLinear(layer) for layer in plain])
    rows = []
    for batch in BATCHES:
        runs = {}
        for name, (plain, packed) in blocks.items():
            inputs = [torch.randn(batch, layer.in_features, dtype=DTYPES[name]) for layer in plain]
            runs[f"{name} nn.Linear"] = _run(plain, inputs)
            runs[f"{name} packed"] = _run(packed, inputs)
            if name == "bfloat16":
                runs[f"{name} weight-major"] = _run([_weight_major(layer) for layer in plain], inputs)
        times = interleaved_seconds(runs, repeats, min_round_seconds=MIN_ROUND_SECONDS)
        rows.append({
            "batch": batch, "milliseconds": {name: min(t) * 1e3 for name, t in times.items()},
            "bf16_packed_speedup": speedup(times["bfloat16 nn.Linear"], times["bfloat16 packed"]),
            "f32_packed_speedup": speedup(times["float32 nn.Linear"], times["float32 packed"]),
            "bf16_packed_over_f32_packed": speedup(times["float32 packed"], times["bfloat16 packed"]),
            "bf16_weight_major_speedup": speedup(times["bfloat16 nn.Linear"], times["bfloat16 weight-major"]),
            "bf16_weight_major_over_packed": speedup(times["bfloat16 packed"], times["bfloat16 weight-major"]),
            "seconds": times,
        })
    return rows


def markdown(rows: list[dict[str, Any]], d_model: int) -> str:
    names = list(rows[0]["milliseconds"])
    ratios = (("bf16_packed_speedup", "bf16 packed / bf16 nn.Linear"),
              ("f32_packed_speedup", "f32 packed / f32 nn.Linear"),
              ("bf16_packed_over_f32_packed", "bf16 packed / f32 packed"),
              ("bf16_weight_major_speedup", "bf16 weight-major / bf16 nn.Linear"),
              ("bf16_weight_major_over_packed", "bf16 weight-major / bf16 packed"))
    lines = [
        f"One MPT block's linear layers at d_model {d_model}: milliseconds (fastest round), and "
        "speed-ups (median of the rounds' ratios, interquartile range):", "",
        "| rows | " + " | ".join(names) + " | " + " | ".join(title for _, title in ratios) + " |",
        "| --- " * (1 + len(names) + len(ratios)) + "|",
    ]
    for row in rows:
        cells = [f"{row['milliseconds'][n]:.2f}" for n in names]
        cells += [f"{row[k]['median']:.2f}x ({row[k]['q1']:.2f}-{row[k]['q3']:.2f})" for k, _ in ratios]
        lines.append(f"| {row['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    """The table and the machine it ran on."""
    m = results["machine"]
    return (markdown(results["rows"], results["d_model"]) + f"\n\nCPU: {m['cpu_model']} (flags: "
            f"{bf16_flags(m['cpu_flags'])}); {m['torch_threads']} torch thread(s); torch {m['torch']}; "
            f"{m['date']}; load average {m['load_average'][0]:.1f}.\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.linear", description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=1024, help="hidden size (default 1024; mpt-7b: 4096)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"d_model": args.d_model, "machine": machine(""), "rows": measure(args.d_model, args.repeats)}
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
