"""``python -m benchmarks.structured``: tokens/s with a JSON schema against free generation.

One loaded model, one batch of prompts, the same number of new tokens, the two taking turns:
free (``response_format`` text) and held to a schema no output completes within the budget
(an array of records), so every step of every row pays for its mask. Prints the median ratio
of constrained to free tokens/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "benchmarks"
RECORDS = {
    "type": "array", "minItems": 100,
    "items": {"type": "object", "required": ["name", "age", "tags"], "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    }},
}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.settings import SMOKE, Settings, prompts

    default = Settings()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.structured", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few rounds: checks it runs")
    parser.add_argument("--prompts", type=int, default=default.prompts, help=f"batch size (default {default.prompts})")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the snapshot is built and reused")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else default
    rounds, batch = (1, 2) if args.smoke else (args.rounds, args.prompts)

    import mlflow

    from benchmarks.measure import interleaved_seconds, median_ratio
    from benchmarks.snapshot import parameters, snapshot
    from benchmarks.store import temporary_store
    from templated_llm import log_llm

    path = snapshot(settings, args.cache)
    with temporary_store("structured"):
        model = mlflow.pyfunc.load_model(log_llm("mpt-instruct", snapshot=path, tracing=False).model_uri)
        base = {"temperature": 0.0, "max_tokens": args.new_tokens, "return_usage": True}
        formats = {"free": {"type": "text"},
                   "schema": {"type": "json_schema", "json_schema": {"name": "records", "schema": RECORDS}}}
        tokens: dict[str, int] = {}

        def run(name: str) -> None:
            frame = model.predict(prompts(batch), params={**base, "response_format": formats[name]})
            tokens[name] = int(frame["completion_tokens"].sum())

        times = interleaved_seconds({name: (lambda n=name: run(n)) for name in formats}, rounds)
    # Greedy: every round generates the same tokens, so the rate ratio is the time ratio, scaled.
    ratio = median_ratio(times["free"], times["schema"]) * tokens["schema"] / tokens["free"]
    print(f"model: MPT, {parameters(path) / 1e6:.1f}M parameters; batch of {batch}, {args.new_tokens} new "
          f"tokens per row; {rounds} rounds; tokens generated: free {tokens['free']}, schema {tokens['schema']}")
    for name in formats:
        print(f"{name:>6}: {tokens[name] / statistics.median(times[name]):.1f} tokens/s (median)")
    print(f"schema / free tokens/s: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
