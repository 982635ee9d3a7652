"""Each figure of the benchmark, measured side by side in one process (or one per server)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
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

from benchmarks.contenders import FLAVOR, GREEDY, MODEL, TEMPLATED, TUTORIAL, Contender, generate_texts, render
from benchmarks.counting import TokenShortfall, generate_spy
from benchmarks.measure import cpu_time_shares, interleaved_seconds, median_ratio
from benchmarks.settings import Settings, prompts, words
from templated_llm.cli import serve_command
from templated_llm.model_logging.log import log_llm
from tests.local_server import free_port, running_server

REPO = Path(__file__).resolve().parents[1]
_PROFILED_OPS = 10  # operators kept per backend from the end-to-end prefill's profile


def _sample(settings: Settings, count: int) -> list[str]:
    """``count`` prompts spread evenly over the list (first to last), so their lengths span it."""
    every = prompts(settings.prompts)
    return [every[round(j * (len(every) - 1) / max(1, count - 1))] for j in range(count)]


def _tokens_per_s(count: int, settings: Settings, times: list[float], warm_up: float) -> dict[str, Any]:
    seconds = statistics.median(times)
    # Every timed call made exactly new_tokens per prompt: the contenders count them (or fail).
    return {"prompts": count, "repeats": len(times), "seconds": seconds, "all_seconds": times,
            "tokens_per_round": count * settings.new_tokens, "warm_up_seconds": warm_up,
            "tokens_per_s": count * settings.new_tokens / seconds}


def throughput(contenders: list[Contender], settings: Settings) -> dict[str, dict[str, Any]]:
    """Tokens/s generating ``new_tokens`` per prompt, the contenders taking turns in each round.

    A batching contender gets every prompt in one call. One that generates one prompt at a time
    does the same work per prompt whatever the batch, so it gets ``serial_prompts`` of them.
    """
    work = {c.name: prompts(settings.prompts) if not c.serial else _sample(settings, settings.serial_prompts)
            for c in contenders}
    warm_ups: dict[str, float] = {}
    times = interleaved_seconds(
        {c.name: (lambda c=c: c.complete(work[c.name], settings.new_tokens)) for c in contenders},
        settings.repeats, warm_ups)
    return {name: _tokens_per_s(len(work[name]), settings, t, warm_ups[name]) for name, t in times.items()}


def throughput_ratio(faster: dict[str, Any], slower: dict[str, Any]) -> float:
    """Median over rounds of the tokens/s ratio of two contenders measured in the same rounds."""
    return median_ratio([s / slower["prompts"] for s in slower["all_seconds"]],
                        [s / faster["prompts"] for s in faster["all_seconds"]])


def overhead(templated: Contender, settings: Settings) -> dict[str, Any]:
    """One prompt: TemplatedLLM's ``predict`` against the same loaded model's own ``generate``
    (the tokenizer on the rendered prompt, ``generate``, decode), same kernels, same tokens."""
    python_model = templated.extra["pyfunc"].unwrap_python_model()
    model, tokenizer = python_model.model, python_model.tokenizer
    own = Contender("generate", f"{templated.label}: its model's own generate",
                    lambda texts, n: generate_texts(model, tokenizer, python_model.render(texts), n),
                    model, generate_spy(model), templated.kind, serial=False)
    text = prompts(1)
    times = interleaved_seconds({"predict": lambda: templated.complete(text, settings.new_tokens),
                                 "generate": lambda: own.complete(text, settings.new_tokens)},
                                settings.repeats)
    return {"predict_seconds": statistics.median(times["predict"]),
            "generate_seconds": statistics.median(times["generate"]),
            "ratio": median_ratio(times["predict"], times["generate"]), "all_seconds": times}


def prefill_forward(backends: dict[str, Contender], settings: Settings) -> dict[str, list[float]]:
    """Seconds of one forward pass over a ``prefill_tokens``-token prompt, per backend: the
    model alone, keeping only the last position's logits as ``generate`` does."""
    ids = torch.randint(1, 200, (1, settings.prefill_tokens), generator=torch.Generator().manual_seed(0))

    def forward(model) -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    return interleaved_seconds({backend: (lambda m=c.model: forward(m)) for backend, c in backends.items()},
                               settings.repeats)


def long_prompt(templated: Contender, tokens: int) -> tuple[str, int]:
    """The longest prompt of ``words`` whose rendered text is at most ``tokens`` tokens, and its
    token count (at least one word, whatever the template's own length)."""
    python_model = templated.extra["pyfunc"].unwrap_python_model()

    def length(n: int) -> int:
        return len(python_model.tokenizer(python_model.render([words(n)])[0]).input_ids)

    low, high = 1, tokens
    while low < high:  # the largest n with length(n) <= tokens
        middle = (low + high + 1) // 2
        low, high = (middle, high) if length(middle) <= tokens else (low, middle - 1)
    return words(low), length(low)


def prefill_end_to_end(backends: dict[str, Contender], settings: Settings) -> dict[str, Any]:
    """Seconds of ``predict`` with ``max_tokens=1`` on a prompt of about ``prefill_tokens``
    tokens, per backend: the forward pass plus all the request path adds."""
    text, tokens = long_prompt(next(iter(backends.values())), settings.prefill_tokens)
    times = interleaved_seconds({backend: (lambda c=c: c.complete([text], 1)) for backend, c in backends.items()},
                                settings.repeats)
    # Where each spends its time: the largest operators' shares of one predict's CPU time.
    shares = {backend: dict(list(cpu_time_shares(lambda c=c: c.complete([text], 1)).items())[:_PROFILED_OPS])
              for backend, c in backends.items()}
    return {"prompt_tokens": tokens, "seconds": times, "cpu_time_shares": shares}


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
    if contender.kind == FLAVOR:
        return {"input": {"prompt": render([prompt])[0], "max_tokens": max_tokens}}
    if contender.kind == TUTORIAL:
        return {"input": {"prompt": [prompt]}, "params": {"max_tokens": max_tokens}}
    return {"input": {"prompt": [prompt]}, "params": {**GREEDY, "max_tokens": max_tokens, "return_usage": True}}


def _completion_tokens(contender: Contender, response: dict[str, Any]) -> list[int]:
    """New tokens per prompt, as the server counted them (TemplatedLLM's usage columns, the
    flavor's OpenAI-style ``usage``)."""
    if contender.kind == TEMPLATED:
        return [row["completion_tokens"] for row in response["predictions"]]
    return [response["predictions"][0]["usage"]["completion_tokens"]]


def _body(contender: Contender, prompt: str, max_tokens: int) -> dict[str, Any]:
    request = _request(contender, prompt, max_tokens)
    return {"inputs": request["input"], **({"params": request["params"]} if "params" in request else {})}


def served_requests_per_s(contenders: list[Contender], settings: Settings) -> dict[str, dict[str, Any]]:
    """Requests/s of ``clients`` concurrent clients, each sending one-prompt requests in turn, to
    each contender behind its own ``mlflow models serve`` (one worker). The servers run at once and
    take turns at the rounds of requests, after a warm-up round each. Every response must carry
    ``serve_tokens`` new tokens, as the server counted them."""
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
            if (counted := _completion_tokens(contender, response.json())) != [settings.serve_tokens]:
                raise TokenShortfall(f"{contender.label} served {counted} new tokens where "
                                     f"{settings.serve_tokens} were asked for")

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
        warm_ups: dict[str, float] = {}
        times = interleaved_seconds(
            {c.name: (lambda c=c: round_of_requests(urls[c.name], c)) for c in contenders},
            settings.repeats, warm_ups)
    sent = settings.clients * settings.requests_per_client
    return {name: {"requests": sent, "seconds": statistics.median(t), "all_seconds": t,
                   "warm_up_seconds": warm_ups[name], "requests_per_s": sent / statistics.median(t),
                   "per_round_requests_per_s": [sent / x for x in t]}
            for name, t in times.items()}


def _cpu() -> dict[str, Any]:
    """The CPU's model name and feature flags (AVX-512, AMX, ... decide which kernels run)."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return {"cpu_model": fields.get("model name", platform.processor() or platform.machine()),
            "cpu_flags": fields.get("flags", "").split()}


def machine(note: str) -> dict[str, Any]:
    import importlib.metadata

    return {
        "cpus": os.cpu_count(),
        **_cpu(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "note": note,
        "python": platform.python_version(),
        **{p: importlib.metadata.version(p) for p in ("torch", "transformers", "mlflow")},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
