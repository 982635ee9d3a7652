"""``python -m benchmarks.mixed``: a mixed workload of requests arriving over time.

32 requests arrive as a Poisson process; prompts of 16-512 tokens, max_tokens 16-256, half
greedy and half temperature 0.7, a quarter with stop strings. Each contender serves the same
requests, one contender after the other in this one process (the machine may be shared: compare
the ratios of one run, not figures across runs):

1. today's whole-batch path (MicroBatcher: requests merge only when their params are equal),
2. transformers' continuous batching (``init_continuous_batching``) on a Llama of the same size,
3. the engine, on MPT and on that Llama.

Also the existing 16 prompts x 128 greedy tokens batch: the engine against plain transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "benchmarks"


@dataclass(frozen=True)
class Request:
    arrival: float  # seconds after the start
    prompt: list[int]
    max_tokens: int
    temperature: float
    stop: list[str]

    def params(self) -> dict:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, "stop": self.stop,
                "seed": None}


@dataclass
class Timing:
    """perf_counter times of one request: arrival, first token, end; and tokens generated."""

    arrival: float
    first: float
    end: float
    tokens: int


def workload(count: int, rate: float, vocab: int, prompt_range: tuple[int, int],
             tokens_range: tuple[int, int], seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    arrival, requests = 0.0, []
    for i in range(count):
        arrival += rng.expovariate(rate)
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_range))]
        requests.append(Request(arrival, prompt, rng.randint(*tokens_range),
                                0.0 if i % 2 == 0 else 0.7, ["the"] if i % 4 == 1 else []))
    return requests


def replay(requests: list[Request], serve: Callable[[Request, float], Timing]) -> list[Timing]:
    """Each request on its own thread at its arrival time; ``serve`` returns its timing."""
    start = time.perf_counter()
    timings: list[Timing | None] = [None] * len(requests)

    def client(i: int, request: Request) -> None:
        time.sleep(max(0.0, start + request.arrival - time.perf_counter()))
        timings[i] = serve(request, time.perf_counter())

    threads = [threading.Thread(target=client, args=(i, r)) for i, r in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return timings


def summary(timings: list[Timing]) -> dict:
    span = max(t.end for t in timings) - min(t.arrival for t in timings)
    tokens = sum(t.tokens for t in timings)

    def pct(values: list[float]) -> dict:
        ordered = sorted(values)
        return {"p50": statistics.median(ordered),
                "p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]}

    return {
        "output_tokens": tokens, "seconds": span, "tokens_per_s": tokens / span,
        "latency": pct([t.end - t.arrival for t in timings]),
        "ttft": pct([t.first - t.arrival for t in timings]),
        "per_token": pct([(t.end - t.first) / (t.tokens - 1) for t in timings if t.tokens > 1]),
    }


def engine_server(engine) -> Callable[[Request, float], Timing]:
    from templated_llm.runtime.params import GenerationParams

    def serve(request: Request, arrival: float) -> Timing:
        handle = engine.submit(request.prompt, GenerationParams(**request.params()))
        completion = handle.result()
        _, first, end = handle.timings
        return Timing(arrival, first, end, completion.completion_tokens)

    return serve


def micro_batcher_server(python_model) -> Callable[[Request, float], Timing]:
    """Today's path: MicroBatcher over whole-batch generate. A request's first token is the end
    of the first forward pass (the prefill) of the generate call that served it."""
    from templated_llm.runtime.params import GenerationParams

    batcher, model = python_model._batcher, python_model.model
    generate, first_token = batcher._generate, {}

    def timed(input_ids, params):
        mark = {}

        def first_forward_ends(*_) -> None:  # a hook returning a value would replace the output
            mark.setdefault("t", time.perf_counter())

        hook = model.register_forward_hook(first_forward_ends)
        try:
            return generate(input_ids, params)
        finally:
            hook.remove()
            first_token.update({id(ids): mark["t"] for ids in input_ids})

    batcher._generate = timed

    def serve(request: Request, arrival: float) -> Timing:
        ids = list(request.prompt)
        [completion] = batcher.submit([ids], GenerationParams(**request.params()))
        return Timing(arrival, first_token[id(ids)], time.perf_counter(), completion.completion_tokens)

    return serve


def transformers_cb_server(model, eos: int) -> tuple[Callable[[Request, float], Timing], Callable[[], None]]:
    """transformers' continuous batching manager; one generation config for every request
    (greedy: it has no per-request temperature here), per-request max_new_tokens."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=256, eos_token_id=eos, pad_token_id=eos)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()

    def serve(request: Request, arrival: float) -> Timing:
        rid = manager.add_request(request.prompt, max_new_tokens=request.max_tokens,
                                  record_timestamps=True)
        result = manager.get_result(request_id=rid, timeout=None)
        while result is None or not result.is_finished():
            result = manager.get_result(request_id=rid, timeout=None)
        return Timing(arrival, result.timestamps[0], result.timestamps[-1], len(result.generated_tokens))

    return serve, manager.stop


def _load(model: str, snapshot: Path, name: str, **options):
    import mlflow

    from templated_llm import log_llm

    info = log_llm(model, snapshot=snapshot, name=name, attention="sdpa", **options)
    return mlflow.pyfunc.load_model(info.model_uri).unwrap_python_model()


def _say(message: str) -> None:
    print(f"[mixed] {message}", flush=True)


def run(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.contenders import plain as plain_transformers
    from benchmarks.measure import interleaved_seconds, median_ratio
    from benchmarks.settings import prompts
    from templated_llm.engine import EngineConfig
    from benchmarks.snapshot import tiny_snapshots

    snapshots = tiny_snapshots(args.cache, args.d_model, args.n_layers, args.n_heads)
    requests = workload(args.requests, args.rate, 1024, (args.min_prompt, args.max_prompt),
                        (args.min_tokens, args.max_tokens))
    slot = max(args.max_prompt + args.max_tokens, 128 + args.batch_tokens)  # and the batch figure
    budget = EngineConfig(max_num_seqs=args.requests, max_cache_tokens=args.requests * slot)
    results: dict = {"workload": {k: v for k, v in vars(args).items() if k not in ("cache", "out")},
                     "machine": _machine(), "contenders": {}}
    out = results["contenders"]

    mpt_engine = _load("mpt-instruct", snapshots["mpt"], "mixed-engine", engine=budget)
    mpt_batcher = _load("mpt-instruct", snapshots["mpt"], "mixed-batcher", engine=False)
    llama_engine = _load("llama2-chat", snapshots["llama"], "mixed-llama", engine=budget)
    warm = requests[:2]
    for name, serve in (("engine_mpt", engine_server(mpt_engine.engine)),
                        ("micro_batcher_mpt", micro_batcher_server(mpt_batcher)),
                        ("engine_llama", engine_server(llama_engine.engine))):
        replay([Request(0, r.prompt, 4, 0.0, []) for r in warm], serve)
        _say(f"{name}: {len(requests)} requests")
        out[name] = summary(replay(requests, serve))
        _say(json.dumps(out[name]))

    cb_model = AutoModelForCausalLM.from_pretrained(snapshots["llama"], dtype=torch.float32).eval()
    try:
        serve, stop = transformers_cb_server(cb_model, cb_model.config.eos_token_id)
        try:
            replay([Request(0, r.prompt, 4, 0.0, []) for r in warm], serve)
            _say(f"transformers_cb_llama: {len(requests)} requests")
            out["transformers_cb_llama"] = summary(replay(requests, serve))
            _say(json.dumps(out["transformers_cb_llama"]))
        finally:
            stop()
    except Exception as exc:  # noqa: BLE001 - reported in the results
        out["transformers_cb_llama"] = {"error": f"{type(exc).__name__}: {exc}"}
    results["transformers_cb_on_mpt"] = _cb_on_mpt(snapshots["mpt"])

    _say("16 x 128 greedy batch: engine against plain transformers, taking turns")
    plain = plain_transformers(snapshots["mpt"])  # renders the prompts with the same MPT template
    texts = prompts(args.batch_prompts)
    greedy = {"temperature": 0.0, "max_tokens": args.batch_tokens}
    seconds = interleaved_seconds({
        "engine": lambda: mpt_engine.predict(None, texts, params=greedy),
        "plain": lambda: plain.generate_texts(texts, args.batch_tokens),
    }, args.repeats)
    results["batch"] = {"seconds": seconds, "engine_over_plain": median_ratio(seconds["plain"], seconds["engine"])}

    engine, batcher = out["engine_mpt"], out["micro_batcher_mpt"]
    results["ratios"] = {
        "engine_vs_micro_batcher_tokens_per_s": engine["tokens_per_s"] / batcher["tokens_per_s"],
        "engine_vs_micro_batcher_ttft_p50": batcher["ttft"]["p50"] / engine["ttft"]["p50"],
        "engine_vs_plain_16x128": results["batch"]["engine_over_plain"],
    }
    if "tokens_per_s" in out["transformers_cb_llama"]:
        results["ratios"]["engine_vs_transformers_cb_llama_tokens_per_s"] = (
            out["engine_llama"]["tokens_per_s"] / out["transformers_cb_llama"]["tokens_per_s"])
    return results


def _cb_on_mpt(snapshot: Path, wait: float = 60.0) -> str:
    """What transformers' continuous batching does with MPT (it has no paged attention for it)."""
    from transformers import GenerationConfig, MptForCausalLM

    model = MptForCausalLM.from_pretrained(snapshot).eval()
    try:
        manager = model.init_continuous_batching(
            generation_config=GenerationConfig(do_sample=False, max_new_tokens=4))
        manager.start()
        manager.add_request([5, 6, 7], max_new_tokens=4)
        result = manager.get_result(timeout=wait)
        manager.stop(block=False)
    except Exception as exc:  # noqa: BLE001 - the finding
        return f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if result is None or result.error:
        return (f"no result within {wait:.0f} s (MptForCausalLM has no AttentionInterface, so "
                f"no paged attention){': ' + result.error[:200] if result and result.error else ''}")
    import torch

    with torch.inference_mode():
        expected = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False,
                                  use_cache=True)[0, 3:].tolist()
    same = "equal to" if result.generated_tokens == expected else "different from"
    return (f"runs in this transformers (on eager attention, with a warning that MPT has no "
            f"paged attention); greedy tokens {same} generate's")


def _machine() -> dict:
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    return {"cpu": fields.get("Model name", "?").strip(), "cpus": os.cpu_count(),
            "flags": " ".join(f for f in fields.get("Flags", "").split() if f.startswith(("avx", "amx"))),
            "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg())}


def markdown(results: dict) -> str:
    rows = ["| contender | output tok/s | latency p50 / p99 (s) | TTFT p50 / p99 (s) | per token p50 / p99 (ms) |",
            "| --- | --- | --- | --- | --- |"]
    for name, r in results["contenders"].items():
        if "error" in r:
            rows.append(f"| {name} | {r['error']} | | | |")
            continue
        rows.append(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['latency']['p50']:.2f} / {r['latency']['p99']:.2f} "
            f"| {r['ttft']['p50']:.2f} / {r['ttft']['p99']:.2f} "
            f"| {1e3 * r['per_token']['p50']:.1f} / {1e3 * r['per_token']['p99']:.1f} |")
    rows += ["", *(f"- {k}: {v:.2f}" for k, v in results["ratios"].items()),
             f"- transformers' continuous batching on MPT: {results['transformers_cb_on_mpt']}",
             f"- machine: {json.dumps(results['machine'])}"]
    return "\n".join(rows) + "\n"


def chart(results: dict, path: Path) -> None:
    """Output tokens/s and time to first token (p50 and p99) per contender, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: r for name, r in results["contenders"].items() if "error" not in r}
    names = list(runs)
    fig, (speed, ttft) = plt.subplots(1, 2, figsize=(11, 3.6))
    speed.barh(names, [runs[n]["tokens_per_s"] for n in names], color="tab:blue")
    speed.set_xlabel("output tokens/s (higher is better)")
    for offset, (quantile, color) in enumerate((("p50", "tab:green"), ("p99", "tab:orange"))):
        ttft.barh([i + 0.2 * (2 * offset - 1) for i in range(len(names))],
                  [runs[n]["ttft"][quantile] for n in names], height=0.4, color=color, label=quantile)
    ttft.set_yticks(range(len(names)), [""] * len(names))
    ttft.set_xscale("log")
    ttft.set_xlabel("time to first token, s (log; lower is better)")
    ttft.legend()
    machine = results["machine"]
    fig.suptitle(f"{results['workload']['requests']} mixed requests arriving over time; "
                 f"{machine['cpu']}, {machine['cpus']} CPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mixed", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model and workload: checks the harness runs")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (default 4)")
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--batch-prompts", type=int, default=16)
    p.add_argument("--batch-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


SMOKE = ["--requests", "4", "--rate", "50", "--min-prompt", "4", "--max-prompt", "12",
         "--min-tokens", "2", "--max-tokens", "4", "--d-model", "64", "--n-layers", "2",
         "--n-heads", "4", "--batch-prompts", "2", "--batch-tokens", "4", "--repeats", "1"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.smoke:
        args = _parser().parse_args([*SMOKE, *(a for a in argv if a != "--smoke")])
    store = Path(tempfile.mkdtemp(prefix="templated-llm-mixed-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    import mlflow

    experiment = mlflow.create_experiment("mixed", artifact_location=(store / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mixed.json").write_text(json.dumps(results, indent=2))
    (args.out / "mixed.md").write_text(markdown(results))
    chart(results, args.out / "mixed.png")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
