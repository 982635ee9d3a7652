"""``python -m benchmarks.gpu --out DIR``: the GPU check (see benchmarks/gpu/check.py).

Phases, each timed and written to DIR/gpu-check.json and DIR/gpu-check.md as it ends:
1. build a tiny random MPT (float32) and a medium one (about 1B parameters, bf16);
2. tiny, float32: every backend ``log_llm`` accepts, loaded through ``mlflow.pyfunc.load_model``,
   against eager: logits on a left-padded batch, greedy output through ``predict``;
3. medium, bf16: the same against a float32 eager reference, plus prefill, decode at batch 1
   and 32, and peak GPU memory per backend;
4. plain transformers (eager, MPT's only attention there) on the same medium snapshot.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _parser() -> argparse.ArgumentParser:
    from benchmarks.gpu.check import BACKENDS

    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="where gpu-check.json and gpu-check.md go")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke, for CI)")
    p.add_argument("--smoke", action="store_true", help="small model and workload: checks the code path")
    p.add_argument("--skip-medium", action="store_true", help="only the tiny model's parity phase")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="skip phases that would not finish within this many seconds (default 330)")
    p.add_argument("--work", type=Path, help="where snapshots and the MLflow store go (default: a temp dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("python -m benchmarks.gpu: no CUDA GPU is visible to torch; run it on a GPU machine, "
              "or use --device cpu --smoke to check the code path", file=sys.stderr)
        return 2
    from benchmarks.gpu import check, phases

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(check.BACKENDS))
    if unknown:
        print(f"--backends: unknown {unknown}; choose from {list(check.BACKENDS)}", file=sys.stderr)
        return 2
    report = check.Report(args.out, args.budget_s)
    report.data["environment"] = check.environment(args.device)
    report.data["settings"] = {"smoke": args.smoke, "backends": backends, "budget_s": args.budget_s}
    work = args.work or Path(tempfile.mkdtemp(prefix="templated-llm-gpu-check-"))
    phases.run(report, work, args.device, backends, smoke=args.smoke, medium=not args.skip_medium)
    print((args.out / "gpu-check.md").read_text())
    failed = [name for name, phase in report.data["phases"].items() if "error" in phase]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
