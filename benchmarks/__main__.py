"""``python -m benchmarks``: every contender on the same snapshot and prompts, side by side.

Writes latest.json, latest.md and latest.png to benchmarks/results/ (or --out), and then the
figures the docs show (benchmarks/pages.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "benchmarks"


def _parser() -> argparse.ArgumentParser:
    from benchmarks.settings import Settings

    d = Settings()
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model and workload: checks the harness runs")
    p.add_argument("--mixed", action="store_true",
                   help="also run the mixed workload of arriving requests (python -m benchmarks.mixed)")
    p.add_argument("--size", choices=["mpt-7b", "mpt-7b-scaled", "25m", "smoke"],
                   help="instead: the model at real size in the dtype auto picks, against plain "
                        "transformers and the memory bandwidth limit (mpt-7b: 40 GB of disk, 18 GB "
                        "of free memory; see benchmarks/full_size.py)")
    p.add_argument("--d-model", type=int, default=d.d_model, help=f"hidden size (default {d.d_model})")
    p.add_argument("--n-layers", type=int, default=d.n_layers, help=f"blocks (default {d.n_layers}: ~25M parameters)")
    p.add_argument("--prompts", type=int, default=d.prompts, help=f"prompts per batch (default {d.prompts})")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help=f"new tokens per prompt (default {d.new_tokens})")
    p.add_argument("--repeats", type=int, default=d.repeats, help=f"timed runs per figure, median taken (default {d.repeats})")
    p.add_argument("--serial-prompts", type=int, default=d.serial_prompts,
                   help=f"prompts timed for one-prompt-at-a-time contenders (default {d.serial_prompts})")
    p.add_argument("--clients", type=int, default=d.clients, help=f"concurrent clients when served (default {d.clients})")
    p.add_argument("--serve-tokens", type=int, default=d.serve_tokens, help=f"new tokens per served request (default {d.serve_tokens})")
    p.add_argument("--cache", type=Path, default=CACHE, help="where snapshots are built and reused (default .cache/benchmarks)")
    p.add_argument("--out", type=Path, default=None,
                   help="where results go (default benchmarks/results; with --smoke CACHE/smoke)")
    p.add_argument("--note", default="", help="a line recorded with the machine, e.g. what else was running")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of every process of the run (default 0: torch's default, one per "
                        "core); 1 gives steadier ratios on a machine other jobs share")
    p.add_argument("--traced", action="store_true",
                   help="TemplatedLLM traces every predict to the run's MLflow store (default: off, as no "
                        "other contender traces; python -m benchmarks.tracing measures what tracing costs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:  # before torch is imported, here and in every child process of the run
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    from benchmarks.settings import SMOKE, Settings

    settings = SMOKE if args.smoke else Settings(
        d_model=args.d_model, n_layers=args.n_layers, prompts=args.prompts,
        new_tokens=args.new_tokens, repeats=args.repeats, serial_prompts=args.serial_prompts,
        clients=args.clients, serve_tokens=args.serve_tokens,
    )
    settings = dataclasses.replace(settings, traced=args.traced)
    from templated_llm.runtime.tracing import TRACING_ENV

    # Read where each model loads: in this process, the load-memory children and the servers.
    os.environ[TRACING_ENV] = "true" if settings.traced else "false"
    from benchmarks.store import temporary_store

    with temporary_store("benchmarks"):
        if args.size:
            from benchmarks import full_size

            out = args.out or RESULTS
            print(full_size.write(full_size.run(args.size, args.cache), out).read_text())
            if out.resolve() == RESULTS:  # the reference results: the docs show their figures
                from benchmarks import pages

                pages.update(json.loads(pages.LATEST.read_text()))
            return 0
        from benchmarks.report import write
        from benchmarks.run import run

        out = args.out or (args.cache / "smoke" if args.smoke else RESULTS)
        results = run(settings, args.cache, args.note)
        write(results, out)
        if out.resolve() == RESULTS:  # the reference results: the docs show their figures
            from benchmarks.pages import update

            update(results)
        if args.mixed:
            from benchmarks import mixed

            mixed.main([*(["--smoke"] if args.smoke else []), "--out", str(out)])
        print((out / "latest.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
