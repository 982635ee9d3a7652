"""``python -m benchmarks.serving``: served chat requests, side by side on one machine.

A mixed workload of OpenAI chat requests (by default the engine benchmark's: prompts of 16-512
words, about a token each, max_tokens 16-256, half greedy and half at temperature 0.7, a quarter
with a stop string) from concurrent clients, streamed and not, against:

1. ``templated-llm serve``, OpenAI route, on the benchmark's MPT snapshot;
2. the same server's ``/invocations`` with the same requests (the OpenAI layer's cost);
3. ``transformers serve --continuous-batching`` on a Llama snapshot of the same size, and
   ``templated-llm serve`` (plugin ``hf-chat``) on that Llama;
4. MLflow's transformers flavor of that Llama (task ``llm/v1/chat``) under ``mlflow models serve``.

Writes serving.json and serving.md to benchmarks/results/ (or --out); with ``--dtype bfloat16``
(both snapshots stored in bfloat16, as real checkpoints ship), serving-bfloat16.json and .md;
``--tag short`` appends ``-short`` to the name (for a run with other ``--max-tokens``, say).
``--greedy`` makes every request greedy: ``transformers serve`` decodes every request with the
first request's sampling settings (greedy, after the warm-up), and this makes the others do the
same work.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

RESULTS = Path(__file__).resolve().parent / "results"
# Every server waits this long for a request (MLflow's default is 60 s): a run measures how fast
# they serve, not which gives up first.
_TIMEOUT = 3600
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "benchmarks"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ServingSettings:
    d_model: int = 512  # with n_layers=8: about 25M parameters, as python -m benchmarks
    n_layers: int = 8
    n_heads: int = 8
    clients: tuple[int, ...] = (16, 64)
    requests_per_client: int = 1
    # Each client count and mode runs this many times, the contenders taking turns each round; a
    # ratio is the median of the per-round ratios (one run of 16 clients lasts seconds, and one
    # contender's figure moves by a fifth from run to run on a shared 2-core machine).
    rounds: int = 3
    # The mixed workload of python -m benchmarks.mixed: prompts of 16-512 tokens, max_tokens 16-256.
    prompt_words: tuple[int, int] = (16, 512)
    max_tokens: tuple[int, int] = (16, 256)
    # templated-llm traces every request where MLflow tracing is on; the other servers trace
    # nothing, so by default it is off for the comparison (--traced to measure it on).
    traced: bool = False
    # The dtype both snapshots store their weights in; every server loads the checkpoint's dtype
    # (templated-llm's auto where the CPU computes it natively, transformers' "auto").
    dtype: str = "float32"
    # Every request greedy: `transformers serve --continuous-batching` decodes every request with
    # the first request's sampling settings, so with a greedy warm-up it decodes greedily whatever
    # a request asks; this makes the others do the same work.
    greedy: bool = False


SMOKE = ServingSettings(d_model=64, n_layers=2, n_heads=4, clients=(2,), prompt_words=(4, 16),
                        max_tokens=(2, 4), rounds=2)


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    server: str  # which server process answers
    route: Any  # serving_load.Route


def _say(message: str) -> None:
    print(f"[bench.serving] {message}", flush=True)


def _snapshots(settings: ServingSettings, cache: Path) -> tuple[Path, Path]:
    from benchmarks.settings import Settings
    from benchmarks.snapshot import dtype_suffix, snapshot
    from templated_llm.devtools.tiny import ZEPHYR_CHAT_TEMPLATE, build_tiny_model

    mpt = snapshot(Settings(d_model=settings.d_model, n_layers=settings.n_layers, n_heads=settings.n_heads),
                   cache, settings.dtype)
    llama = cache / (f"llama-chat-d{settings.d_model}-l{settings.n_layers}-h{settings.n_heads}"
                     f"{dtype_suffix(settings.dtype)}")
    if not (llama / "config.json").is_file():
        build_tiny_model("llama", llama, hidden_size=settings.d_model, n_layers=settings.n_layers,
                         n_heads=settings.n_heads, chat_template=ZEPHYR_CHAT_TEMPLATE, dtype=settings.dtype)
    return mpt, llama


def _mlflow_flavor(llama: Path) -> str:
    import importlib.metadata

    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    generator = pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained(llama),
                         tokenizer=AutoTokenizer.from_pretrained(llama))
    pins = [f"{p}=={importlib.metadata.version(p)}" for p in ("mlflow", "torch", "transformers", "accelerate")]
    return mlflow.transformers.log_model(transformers_model=generator, name="transformers-flavor-chat",
                                         task="llm/v1/chat", pip_requirements=pins).model_uri


def _kv_blocks(settings: ServingSettings) -> int:
    """transformers serve's KV cache in 256-token blocks, sized for the workload (left to itself,
    it takes 90% of the free memory)."""
    longest = 2 * settings.prompt_words[1] + 64 + settings.max_tokens[1]  # tokens, generously
    return max(settings.clients) * -(-longest // 256) + 16


@contextlib.contextmanager
def _servers(mpt: Path, llama: Path, settings: ServingSettings) -> Iterator[dict[str, str]]:
    """Every server, started at once; their base URLs by name."""
    from tests.local_server import free_port, running_server
    from templated_llm.model_logging.log import log_llm
    from templated_llm.runtime.tracing import TRACING_ENV

    cli = [sys.executable, "-m", "templated_llm.cli", "serve"]
    patient = ["--request-timeout", str(_TIMEOUT)]
    commands = {
        "templated_mpt": (cli + [log_llm("mpt-instruct", snapshot=mpt, name="bench-mpt").model_uri, *patient],
                          "/ping"),
        "templated_llama": (cli + [log_llm("hf-chat", snapshot=llama, name="bench-llama").model_uri, *patient],
                            "/ping"),
        "mlflow_flavor": (cli + [_mlflow_flavor(llama), "--mlflow-only"], "/ping"),
        "transformers_serve": ([str(Path(sys.executable).parent / "transformers"), "serve", str(llama),
                                "--continuous-batching", "--cb-num-blocks", str(_kv_blocks(settings)),
                                "--device", "cpu", "--host", "127.0.0.1"], "/health"),
    }
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(_TIMEOUT),
           TRACING_ENV: "true" if settings.traced else "false"}
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, (command, ready) in commands.items():
            port = free_port()
            _say(f"starting {name}")
            urls[name] = stack.enter_context(running_server(
                [*command, "--port", str(port)], port, env=env, timeout=900, ready_path=ready))
        yield urls


def _contenders(llama: Path) -> list[Contender]:
    from benchmarks.serving_load import invocations_route, mlflow_chat_route, openai_route

    return [
        Contender("templated_mpt_openai", "1. templated-llm serve, OpenAI route (MPT)", "templated_mpt",
                  openai_route("mpt-instruct")),
        Contender("templated_mpt_invocations", "2. the same server's /invocations (MPT)", "templated_mpt",
                  invocations_route(chat=False)),
        Contender("transformers_serve", "3a. transformers serve --continuous-batching (Llama)",
                  "transformers_serve", openai_route(str(llama))),
        Contender("templated_llama_openai", "3b. templated-llm serve, OpenAI route (Llama)", "templated_llama",
                  openai_route("hf-chat")),
        Contender("mlflow_flavor", "4. MLflow transformers flavor under mlflow models serve (Llama)",
                  "mlflow_flavor", mlflow_chat_route()),
    ]


def _server_rss(url: str) -> int:
    import psutil

    port = url.rsplit(":", 1)[1]
    roots = [p for p in psutil.Process().children() if port in " ".join(p.cmdline())]
    return sum(p.memory_info().rss for root in roots for p in [root, *root.children(recursive=True)])


def run(settings: ServingSettings, cache: Path, note: str = "") -> dict[str, Any]:
    from benchmarks.figures import machine
    from benchmarks.serving_load import run_clients, workload

    mpt, llama = _snapshots(settings, cache)
    contenders = _contenders(llama)
    results: dict[str, Any] = {"settings": asdict(settings), "machine": machine(note),
                               "contenders": {c.name: c.label for c in contenders}, "runs": [], "rss": {}}
    with _servers(mpt, llama, settings) as urls:
        _say("warming up")
        for contender in contenders:
            for stream in (False, True)[: 1 + contender.route.streams]:
                run_clients(urls[contender.server], contender.route, workload(2, (4, 8), (2, 4), seed=1), 2, stream)
        results["rss"]["idle"] = {name: _server_rss(url) for name, url in urls.items()}
        turn = 0
        for clients in settings.clients:
            requests = workload(clients * settings.requests_per_client, settings.prompt_words, settings.max_tokens,
                                greedy=settings.greedy)
            for stream, round_ in itertools.product((False, True), range(settings.rounds)):
                taking_part = [c for c in contenders if c.route.streams or not stream]
                turn += 1
                # Taking turns, the order rotating, so that load from elsewhere hits them all alike.
                for contender in taking_part[turn % len(taking_part):] + taking_part[: turn % len(taking_part)]:
                    _say(f"{contender.name}: {clients} clients, {'streamed' if stream else 'whole'}, "
                         f"round {round_ + 1} of {settings.rounds}")
                    measured = run_clients(urls[contender.server], contender.route, requests, clients, stream)
                    results["runs"].append({"contender": contender.name, "clients": clients, "stream": stream,
                                            "round": round_, **measured})
        results["rss"]["after"] = {name: _server_rss(url) for name, url in urls.items()}
    results["figures"] = _figures(results["runs"], settings)
    return results


def _by_round(runs: list[dict[str, Any]]) -> dict[tuple[str, int, bool], dict[int, dict[str, Any]]]:
    """The runs of each (contender, client count, streamed), by round (a run from before rounds: 0)."""
    groups: dict[tuple[str, int, bool], dict[int, dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["contender"], r["clients"], r["stream"]), {})[r.get("round", 0)] = r
    return groups


def _median_ratio(runs: list[dict[str, Any]], clients: int, stream: bool, ours: str, theirs: str,
                  value: Callable[[dict[str, Any]], float | None]) -> float | None:
    """The median over rounds of value(ours) / value(theirs), both from the same round."""
    groups = _by_round(runs)
    a, b = groups.get((ours, clients, stream), {}), groups.get((theirs, clients, stream), {})
    ratios = [r for r in (_ratio(value(a[k]), value(b[k])) for k in sorted(a.keys() & b.keys())) if r is not None]
    return statistics.median(ratios) if ratios else None


def _merged(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per contender, client count and mode: each figure's median over the rounds, errors
    summed."""
    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    rows = []
    for (contender, clients, stream), by_round in _by_round(runs).items():
        group = list(by_round.values())
        rows.append({"contender": contender, "clients": clients, "stream": stream, "rounds": len(group),
                     "errors": sum(r["errors"] for r in group),
                     **{key: median([r[key] for r in group]) for key in ("requests_per_s", "output_tokens_per_s")},
                     **{key: {p: median([r[key][p] for r in group]) for p in ("p50", "p99")}
                        for key in ("ttft_s", "tpot_s", "latency_s")}})
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def _figures(runs: list[dict[str, Any]], settings: ServingSettings) -> list[dict[str, Any]]:
    """The issue's targets, per client count: (name, value, target, met)."""
    figures = []

    def add(name: str, value: float | None, comparison: str, target: float) -> None:
        met = None if value is None else (value >= target if comparison == ">=" else value <= target)
        figures.append({"figure": name, "value": value, "target": f"{comparison} {target:g}", "met": met})

    def tokens(run: dict[str, Any]) -> float:
        return run["output_tokens_per_s"]

    def ttft(run: dict[str, Any]) -> float | None:
        return run["ttft_s"]["p50"]

    for c in settings.clients:
        add(f"{c} clients, whole: output tokens/s, OpenAI route / /invocations (MPT)",
            _median_ratio(runs, c, False, "templated_mpt_openai", "templated_mpt_invocations", tokens), ">=", 0.95)
        for stream in (False, True):
            add(f"{c} clients, {'streamed' if stream else 'whole'}: output tokens/s, templated-llm serve / "
                "transformers serve (Llama)",
                _median_ratio(runs, c, stream, "templated_llama_openai", "transformers_serve", tokens), ">=", 1.5)
        add(f"{c} clients, streamed: time to first token p50, transformers serve / templated-llm serve (Llama)",
            _median_ratio(runs, c, True, "transformers_serve", "templated_llama_openai", ttft), ">=", 1.0)
        add(f"{c} clients, whole: output tokens/s, templated-llm serve / MLflow transformers flavor (Llama)",
            _median_ratio(runs, c, False, "templated_llama_openai", "mlflow_flavor", tokens), ">=", 5.0)
        ours = [r for r in runs if r["clients"] == c and r["contender"].startswith("templated")]
        add(f"{c} clients: errors answered by templated-llm serve", float(sum(r["errors"] for r in ours)), "<=", 0)
    return figures


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f}"


def markdown(results: dict[str, Any]) -> str:
    from benchmarks.measure import bf16_flags

    lines = ["| figure | measured | target | met |", "| --- | --- | --- | --- |"]
    for f in results["figures"]:
        value = "n/a" if f["value"] is None else f"{f['value']:.3g}"
        met = {True: "yes", False: "**no**", None: "n/a"}[f["met"]]
        lines.append(f"| {f['figure']} | {value} | {f['target']} | {met} |")
    lines += ["", "| contender | clients | streamed | requests/s | output tokens/s | TTFT p50 / p99 ms | "
              "per-token p50 / p99 ms | latency p50 / p99 ms | errors |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in _merged(results["runs"]):
        lines.append(
            f"| {results['contenders'][r['contender']]} | {r['clients']} | {'yes' if r['stream'] else 'no'} | "
            f"{r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | {_ms(r['ttft_s']['p50'])} / "
            f"{_ms(r['ttft_s']['p99'])} | {_ms(r['tpot_s']['p50'])} / {_ms(r['tpot_s']['p99'])} | "
            f"{_ms(r['latency_s']['p50'])} / {_ms(r['latency_s']['p99'])} | {r['errors']} |")
    s, m = results["settings"], results["machine"]
    rss = ", ".join(f"{n} {results['rss']['idle'][n] / 2**20:.0f} -> {v / 2**20:.0f} MiB"
                    for n, v in results["rss"]["after"].items())
    rounds = s.get("rounds", 1)
    lines += ["", f"Workload: per client count, clients x {s['requests_per_client']} chat requests, prompts of "
              f"{s['prompt_words'][0]}-{s['prompt_words'][1]} words, max_tokens {s['max_tokens'][0]}-"
              f"{s['max_tokens'][1]}, {'all greedy' if s.get('greedy') else 'half greedy, half temperature 0.7'}, "
              "a quarter with a stop string; "
              + (f"{rounds} rounds, the contenders taking turns in each: a figure above is the median of the "
                 "per-round ratios, a row of the table each column's median over the rounds. "
                 if rounds > 1 else "one round. ")
              + f"Snapshots: MPT and Llama, d_model {s['d_model']}, {s['n_layers']} layers, weights stored in "
              f"{s.get('dtype', 'float32')} (every server loads the checkpoint's dtype). "
              f"templated-llm serve traces requests: {'yes' if s.get('traced') else 'no (as the other servers)'}. "
              f"Machine: {m['cpu_model']} (flags: {bf16_flags(m['cpu_flags'])}), {m['cpus']} CPUs{'; ' + m['note'] if m['note'] else ''}, load "
              f"average {m['load_average'][0]:.1f} at the "
              f"start; torch {m['torch']}, transformers {m['transformers']}, mlflow {m['mlflow']}. "
              f"Server RSS, after the warm-up -> at the end: {rss}. MLflow's transformers flavor gets "
              "no temperature for greedy requests (it passes 0 to generate, which refuses it)."]
    return "\n".join(lines) + "\n"


def _tag(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", value):
        raise argparse.ArgumentTypeError(f"a tag is letters, digits, '-' and '_' (it names files); received {value!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    d = ServingSettings()
    parser.add_argument("--smoke", action="store_true", help="tiny model and workload: checks the harness runs")
    parser.add_argument("--clients", type=int, nargs="+", default=list(d.clients),
                        help=f"concurrent clients, one run each (default {' '.join(map(str, d.clients))})")
    parser.add_argument("--requests-per-client", type=int, default=d.requests_per_client,
                        help=f"requests each client sends in turn (default {d.requests_per_client})")
    parser.add_argument("--prompt-words", type=int, nargs=2, default=list(d.prompt_words), metavar=("MIN", "MAX"),
                        help=f"prompt lengths, drawn uniformly (default {d.prompt_words[0]} {d.prompt_words[1]})")
    parser.add_argument("--max-tokens", type=int, nargs=2, default=list(d.max_tokens), metavar=("MIN", "MAX"),
                        help=f"each request's max_tokens, drawn uniformly (default {d.max_tokens[0]} {d.max_tokens[1]})")
    parser.add_argument("--tag", default="", type=_tag, help="appended to the results' file names: serving-TAG.md")
    parser.add_argument("--rounds", type=int, default=d.rounds,
                        help=f"runs of each client count and mode, the contenders taking turns (default {d.rounds})")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where snapshots are built and reused")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go (default benchmarks/results)")
    parser.add_argument("--note", default="", help="a line recorded with the machine, e.g. what else was running")
    parser.add_argument("--traced", action="store_true",
                        help="templated-llm serve traces every request to the run's MLflow store (default: off, "
                             "as the other servers trace nothing)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype,
                        help=f"the dtype both snapshots store their weights in, which every server loads "
                             f"where it can (default {d.dtype})")
    parser.add_argument("--greedy", action="store_true",
                        help="every request greedy (transformers serve decodes all requests with the first "
                             "one's settings: greedy after the warm-up); name the run with --tag")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1; received {args.rounds}")
    settings = SMOKE if args.smoke else ServingSettings(
        clients=tuple(args.clients), requests_per_client=args.requests_per_client,
        prompt_words=tuple(args.prompt_words), max_tokens=tuple(args.max_tokens), rounds=args.rounds)
    settings = replace(settings, traced=args.traced, dtype=args.dtype, greedy=args.greedy)
    from benchmarks.store import temporary_store

    with temporary_store("serving"):
        results = run(settings, args.cache, args.note)
    args.out.mkdir(parents=True, exist_ok=True)
    from benchmarks.snapshot import dtype_suffix

    name = f"serving{dtype_suffix(settings.dtype)}{'-' + args.tag if args.tag else ''}"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
