"""Each figure of the benchmark, measured side by side in one process (or one per server)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import torch

from benchmarks.contenders import GREEDY, MODEL, Contender, render
from benchmarks.measure import interleaved_seconds, median_ratio
from benchmarks.settings import Settings, prompts
from templated_llm.cli import serve_command
from templated_llm.model_logging.log import log_llm
from tests.local_server import free_port, running_server

REPO = Path(__file__).resolve().parents[1]


def _sample(settings: Settings, count: int) -> list[str]:
    """``count`` prompts spread evenly over the list (first to last), so their lengths span it."""
    every = prompts(settings.prompts)
    return [every[round(j * (len(every) - 1) / max(1, count - 1))] for j in range(count)]


def _tokens_per_s(count: int, settings: Settings, times: list[float]) -> dict[str, Any]:
    seconds = statistics.median(times)
    return {"prompts": count, "repeats": len(times), "seconds": seconds, "all_seconds": times,
            "tokens_per_s": count * settings.new_tokens / seconds}


def throughput(contenders: list[Contender], settings: Settings) -> dict[str, dict[str, Any]]:
    """Tokens/s generating ``new_tokens`` per prompt, the contenders taking turns in each round.

    A batching contender gets every prompt in one call. One that generates one prompt at a time
    does the same work per prompt whatever the batch, so it gets ``serial_prompts`` of them.
    """
    work = {c.name: prompts(settings.prompts) if not c.serial else _sample(settings, settings.serial_prompts)
            for c in contenders}
    times = interleaved_seconds(
        {c.name: (lambda c=c: c.complete(work[c.name], settings.new_tokens)) for c in contenders},
        settings.repeats)
    return {name: _tokens_per_s(len(work[name]), settings, t) for name, t in times.items()}


def throughput_ratio(faster: dict[str, Any], slower: dict[str, Any]) -> float:
    """Median over rounds of the tokens/s ratio of two contenders measured in the same rounds."""
    return median_ratio([s / slower["prompts"] for s in slower["all_seconds"]],
                        [s / faster["prompts"] for s in faster["all_seconds"]])


def new_tokens_generated(plain: Contender, settings: Settings) -> int:
    """How many new tokens plain generate made for all prompts (all of them when none stops early)."""
    runner = plain.extra["runner"]
    tokens = runner.tokens(render(prompts(settings.prompts)), settings.new_tokens)
    return int((tokens != runner.tokenizer.pad_token_id).sum())


def one_prompt(templated: Contender, plain: Contender, settings: Settings) -> dict[str, Any]:
    text = prompts(1)
    times = interleaved_seconds({"predict": lambda: templated.complete(text, settings.new_tokens),
                                 "generate": lambda: plain.complete(text, settings.new_tokens)},
                                settings.repeats)
    return {"predict_seconds": statistics.median(times["predict"]),
            "generate_seconds": statistics.median(times["generate"]),
            "ratio": median_ratio(times["predict"], times["generate"]), "all_seconds": times}


def prefill(templated: list[Contender], settings: Settings) -> dict[str, list[float]]:
    """Seconds of one forward pass over a ``prefill_tokens``-token prompt, per backend."""
    ids = torch.randint(1, 200, (1, settings.prefill_tokens), generator=torch.Generator().manual_seed(0))

    def forward(model) -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    return interleaved_seconds(
        {c.name.removeprefix("templated_"): (lambda m=c.extra["pyfunc"].unwrap_python_model().model: forward(m))
         for c in templated},
        settings.repeats)


def log_versus_copy(snapshot: Path, settings: Settings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        copies = iter(range(1_000_000))
        times = interleaved_seconds(
            {"log": lambda: log_llm(MODEL, snapshot=snapshot, name="timed"),
             "copy": lambda: shutil.copytree(snapshot, Path(scratch) / str(next(copies)))},
            settings.repeats)
    return {"log_seconds": statistics.median(times["log"]),
            "copy_seconds": statistics.median(times["copy"]),
            "ratio": median_ratio(times["log"], times["copy"])}


def loads_during_log(snapshot: Path) -> int:
    """Models loaded while logging: calls of from_pretrained and of the pyfunc's load_context."""
    from transformers import PreTrainedModel

    from templated_llm.runtime.pyfunc import TemplatedLLM

    calls = []
    original_from_pretrained = PreTrainedModel.from_pretrained.__func__
    original_load_context = TemplatedLLM.load_context

    def counted_from_pretrained(cls, *args, **kwargs):
        calls.append("from_pretrained")
        return original_from_pretrained(cls, *args, **kwargs)

    def counted_load_context(self, context):
        calls.append("load_context")
        return original_load_context(self, context)

    PreTrainedModel.from_pretrained = classmethod(counted_from_pretrained)
    TemplatedLLM.load_context = counted_load_context
    try:
        log_llm(MODEL, snapshot=snapshot, name="counted")
    finally:
        PreTrainedModel.from_pretrained = classmethod(original_from_pretrained)
        TemplatedLLM.load_context = original_load_context
    return len(calls)


def load_memory(contender: Contender, snapshot: Path, max_tokens: int) -> dict[str, Any]:
    """Peak RSS above the imports of ``mlflow.pyfunc.load_model``, then of a first predict,
    in a fresh interpreter (see benchmarks/load_rss.py)."""
    request = _request(contender, "What is machine learning?", max_tokens)
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.load_rss", contender.model_uri, str(snapshot),
         json.dumps(request)],
        capture_output=True, text=True, cwd=REPO, timeout=900,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )
    if result.returncode != 0:
        raise RuntimeError(f"measuring load memory of {contender.name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _request(contender: Contender, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One prompt as the contender's pyfunc takes it: ``{"input": ..., "params": ...}``."""
    if contender.name == "transformers_flavor":
        return {"input": {"prompt": render([prompt])[0], "max_tokens": max_tokens}}
    params = {"max_tokens": max_tokens} if contender.name == "tutorial" else {**GREEDY, "max_tokens": max_tokens}
    return {"input": {"prompt": [prompt]}, "params": params}


def _body(contender: Contender, prompt: str, max_tokens: int) -> dict[str, Any]:
    request = _request(contender, prompt, max_tokens)
    return {"inputs": request["input"], **({"params": request["params"]} if "params" in request else {})}


def served_requests_per_s(contenders: list[Contender], settings: Settings) -> dict[str, dict[str, Any]]:
    """Requests/s of ``clients`` concurrent clients, each sending one-prompt requests in turn, to
    each contender behind its own ``mlflow models serve`` (one worker). The servers run at once and
    take turns at the rounds of requests."""
    # mlflow starts `uvicorn` from PATH: this interpreter's.
    env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    texts = prompts(settings.clients * settings.requests_per_client)

    def client(url: str, contender: Contender, index: int) -> None:
        for r in range(settings.requests_per_client):
            body = _body(contender, texts[index * settings.requests_per_client + r], settings.serve_tokens)
            response = requests.post(f"{url}/invocations", json=body, timeout=900)
            if response.status_code != 200:
                raise RuntimeError(f"{contender.name} answered {response.status_code}: {response.text[:500]}")

    def round_of_requests(url: str, contender: Contender) -> None:
        with ThreadPoolExecutor(settings.clients) as pool:
            list(pool.map(lambda i: client(url, contender, i), range(settings.clients)))

    with contextlib.ExitStack() as servers:
        urls = {}
        for contender in contenders:
            port = free_port()
            command = serve_command(contender.model_uri, host="127.0.0.1", port=port, workers=1,
                                    env_manager="local")
            urls[contender.name] = servers.enter_context(running_server(command, port, env=env, timeout=600))
        times = interleaved_seconds(
            {c.name: (lambda c=c: round_of_requests(urls[c.name], c)) for c in contenders},
            settings.repeats)
    sent = settings.clients * settings.requests_per_client
    return {name: {"requests": sent, "seconds": statistics.median(t), "all_seconds": t,
                   "requests_per_s": sent / statistics.median(t), "per_round_requests_per_s": [sent / x for x in t]}
            for name, t in times.items()}


def machine() -> dict[str, Any]:
    import importlib.metadata
    import platform

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        **{p: importlib.metadata.version(p) for p in ("torch", "transformers", "mlflow")},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
