"""``python -m benchmarks.tracing``: what tracing costs a request, side by side.

The same snapshot logged twice, with tracing on (traces written to an MLflow store, as a served
model does) and off; one prompt, 64 greedy tokens, the two taking turns. Prints the median
ratio of traced to untraced wall time and the traced request's extra milliseconds, then where
they go: the request's own thread (a one-token request, its trace written out before the
next), and MLflow's background writing of each trace to the store.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "benchmarks"
PROMPT = "Explain the KV cache of a language model in simple words."


def main(argv: list[str] | None = None) -> int:
    from benchmarks.settings import SMOKE, Settings

    default = Settings()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tracing", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few rounds: checks it runs")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the snapshot is built and reused")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else default
    rounds = 2 if args.smoke else args.rounds

    import mlflow

    from benchmarks.measure import interleaved_seconds, median_ratio
    from benchmarks.snapshot import parameters, snapshot
    from benchmarks.store import temporary_store
    from templated_llm import log_llm

    path = snapshot(settings, args.cache)
    with temporary_store("tracing"):
        models = {
            "traced": mlflow.pyfunc.load_model(log_llm("mpt-instruct", snapshot=path, name="traced").model_uri),
            "untraced": mlflow.pyfunc.load_model(
                log_llm("mpt-instruct", snapshot=path, name="untraced", tracing=False).model_uri),
        }
        params = {"temperature": 0.0, "max_tokens": args.new_tokens, "return_usage": True}
        generated = {name: model.predict([PROMPT], params=params)["completion_tokens"][0]
                     for name, model in models.items()}
        times = interleaved_seconds(
            {name: (lambda m=model: m.predict([PROMPT], params=params)) for name, model in models.items()},
            rounds,
        )
        mlflow.flush_trace_async_logging()
        in_request_ms, writing_ms = _costs(models, rounds)
        mlflow.flush_trace_async_logging(terminate=True)  # every trace written before the store goes
        traces = len(mlflow.search_traces(return_type="list", max_results=1000))
    ratio = median_ratio(times["traced"], times["untraced"])
    extra_ms = 1e3 * (statistics.median(times["traced"]) - statistics.median(times["untraced"]))
    print(f"model: MPT, {parameters(path) / 1e6:.1f}M parameters; {generated['traced']} tokens per "
          f"request (untraced: {generated['untraced']}); {rounds} rounds; {traces} traces logged")
    print(f"untraced: {statistics.median(times['untraced']) * 1e3:.1f} ms per request (median)")
    print(f"traced:   {statistics.median(times['traced']) * 1e3:.1f} ms per request (median)")
    print(f"traced / untraced: {ratio:.4f} (overhead {100 * (ratio - 1):+.2f}%, {extra_ms:+.2f} ms)")
    print(f"in the request's thread: {in_request_ms:+.2f} ms per request; writing a trace to the "
          f"store, in MLflow's background threads: {writing_ms:.1f} ms")
    return 0


def _costs(models: dict, rounds: int) -> tuple[float, float]:
    """Tracing's cost in the request's thread, and the background writing of one trace (ms)."""
    import mlflow

    one = {"temperature": 0.0, "max_tokens": 1}
    spent: dict[str, list[float]] = {"traced": [], "untraced": []}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.predict([PROMPT], params=one)
            spent[name].append(time.perf_counter() - start)
            mlflow.flush_trace_async_logging()  # the trace written before the next request
    for _ in range(rounds):
        models["traced"].predict([PROMPT], params=one)
    start = time.perf_counter()
    mlflow.flush_trace_async_logging()
    writing = (time.perf_counter() - start) / rounds
    return 1e3 * (statistics.median(spent["traced"]) - statistics.median(spent["untraced"])), 1e3 * writing


if __name__ == "__main__":
    sys.exit(main())
