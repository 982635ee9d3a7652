"""The GPU check's phases: build snapshots, check every attention backend, time them, report.

Parity is judged as flash-attn's own tests judge it: in bf16 a backend's logits may stray from
a float32 reference by at most twice what eager attention itself strays in bf16 (plus 1e-3 of
the logits' scale). bf16 keeps 8 bits of mantissa, so every matmul rounds at about 0.4% of
its operands; what matters is that a fused kernel adds no error beyond eager's own. In float32
a backend's logits must match eager's within 1e-4 of their scale (summation order only).
Greedy outputs on random weights can still diverge at near ties: where they do, the first
diverging step and eager's own logit margin between the two tokens there are reported.
"""

from __future__ import annotations

import gc
import json
import platform
import shutil
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BACKENDS = ("eager", "sdpa", "triton", "flash", "auto")
PROMPTS = [
    "What is machine learning?",
    "Name three rivers.",
    "Explain attention in one short sentence about the model and its layers.",
    "Write a list of numbers",
]
F32_REL_TOLERANCE = 1e-4
BF16_EAGER_FACTOR = 2.0
BF16_REL_SLACK = 1e-3


@dataclass(frozen=True)
class Size:
    d_model: int
    n_layers: int
    n_heads: int

    @property
    def parameters(self) -> int:  # blocks (attention + 4x MLP) dominate; the vocabulary is tiny
        return 12 * self.n_layers * self.d_model**2


TINY = Size(64, 2, 4)
MEDIUM = Size(2048, 20, 16)  # about 1.0B parameters, stored in bf16
SMOKE_MEDIUM = Size(128, 2, 4)


@dataclass(frozen=True)
class Workload:
    prefill_tokens: int
    new_tokens: int
    decode_batches: tuple[int, ...]
    repeats: int


GPU_WORKLOAD = Workload(prefill_tokens=2048, new_tokens=64, decode_batches=(1, 32), repeats=5)
SMOKE_WORKLOAD = Workload(prefill_tokens=64, new_tokens=4, decode_batches=(1, 4), repeats=1)


class Report:
    """Results so far, written to ``out`` after every phase: a run cut short still reports."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.data: dict[str, Any] = {"phases": {}, "backends": {}, "skipped": {}}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    @contextmanager
    def phase(self, name: str, needs_s: float = 0.0) -> Iterator[bool]:
        """Times a phase; yields False (and records why) when the budget cannot cover it."""
        if self.left() < needs_s:
            self.data["skipped"][name] = f"{self.left():.0f} s of the budget left, phase needs ~{needs_s:.0f} s"
            yield False
            self.save()
            return
        started = time.perf_counter()
        entry: dict[str, Any] = {}
        self.data["phases"][name] = entry
        try:
            yield True
        except Exception as exc:  # noqa: BLE001 - one failing phase must not lose the others
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()[-4000:]
            print(f"[gpu-check] phase {name} FAILED: {entry['error']}", flush=True)
        finally:
            entry["seconds"] = round(time.perf_counter() - started, 2)
            print(f"[gpu-check] {name}: {entry['seconds']} s", flush=True)
            self.save()

    def backend(self, name: str) -> dict[str, Any]:
        return self.data["backends"].setdefault(name, {})

    def save(self) -> None:
        self.data["total_seconds"] = round(time.perf_counter() - self.start, 2)
        (self.out / "gpu-check.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "gpu-check.md").write_text(markdown(self.data))


def environment(device: str) -> dict[str, Any]:
    import importlib.metadata
    import importlib.util

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        **{name: version(name) for name in
           ("torch", "triton", "transformers", "mlflow", "mlflow-skinny", "accelerate", "flash-attn")},
        "flash_attn_importable": importlib.util.find_spec("flash_attn") is not None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, bf16_supported=torch.cuda.is_bf16_supported())
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build_snapshot(path: Path, size: Size, device: str, dtype: torch.dtype, seed: int = 0) -> Path:
    """A random MPT of ``size`` saved in ``dtype``, initialised on ``device`` (no float32 copy
    of a large model on the host), with the tiny builder's locally trained tokenizer."""
    from transformers import MptConfig, MptForCausalLM

    from templated_llm.devtools.tiny import build_tiny_mpt

    tokenizer_source = build_tiny_mpt(path.with_name(path.name + "-tokenizer"), seed=seed)
    config = MptConfig.from_pretrained(tokenizer_source)
    config.update({"d_model": size.d_model, "n_layers": size.n_layers, "n_heads": size.n_heads,
                   "initializer_range": 0.02})
    torch.manual_seed(seed)
    with torch.device(device):
        model = MptForCausalLM(config).to(dtype).eval()
    model.generation_config.use_cache = False  # as mosaicml ships it
    model.save_pretrained(path)
    for file in tokenizer_source.iterdir():
        if "token" in file.name:
            shutil.copy2(file, path / file.name)
    del model
    _free()
    return path


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` runs after one warm-up (which also compiles), and the last result."""
    result = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


class Loaded:
    """One backend of a logged model, loaded through ``mlflow.pyfunc.load_model``."""

    def __init__(self, model_uri: str, attention: str, dtype: str, device: str, engine: bool = True) -> None:
        import mlflow.pyfunc

        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        self.pyfunc = mlflow.pyfunc.load_model(model_uri, model_config={
            "attention": attention, "dtype": dtype, "device": device, "engine": engine})
        self.python_model = self.pyfunc.unwrap_python_model()
        self.model = self.python_model.model
        self.tokenizer = self.python_model.tokenizer
        self.device = device

    @property
    def attention(self) -> str:
        return self.python_model.attention

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)

    @torch.inference_mode()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float32 logits at the real (unpadded) positions, on the host."""
        logits = self.model(**batch, use_cache=False).logits.float()
        return logits[batch["attention_mask"].bool()].cpu()

    def greedy_texts(self, new_tokens: int) -> list[str]:
        frame = self.pyfunc.predict(PROMPTS, params={"temperature": 0.0, "max_tokens": new_tokens})
        return list(frame["candidates"])

    @torch.inference_mode()
    def greedy_steps(self, batch: dict[str, torch.Tensor], new_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Token ids chosen at each greedy step, and the logits of every step, on the host."""
        out = self.model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=self.tokenizer.pad_token_id,
        )
        ids = out.sequences[:, batch["input_ids"].shape[1]:].cpu()
        return ids, [step.float().cpu() for step in out.logits]

    def peak_gib(self) -> float | None:
        if not self.device.startswith("cuda"):
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)

    def close(self) -> None:
        del self.pyfunc, self.python_model, self.model
        _free()


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).abs().max() / reference.abs().max())


def first_divergence(ids: torch.Tensor, eager_ids: torch.Tensor, eager_logits: list[torch.Tensor]) -> dict | None:
    """Where greedy ids first differ from eager's, and eager's margin between the two tokens."""
    differs = (ids != eager_ids).nonzero()
    if len(differs) == 0:
        return None
    steps = differs[:, 1]
    step = int(steps.min())
    row = int(differs[steps == step][0, 0])
    scores = eager_logits[step][row]
    ours, theirs = int(ids[row, step]), int(eager_ids[row, step])
    return {"step": step, "row": row, "eager_token": theirs, "backend_token": ours,
            "eager_logit_gap": round(float(scores[theirs] - scores[ours]), 5),
            "eager_logit_scale": round(float(scores.abs().max()), 3)}


def decode_tokens_per_s(loaded: Loaded, batch_size: int, workload: Workload) -> dict[str, Any]:
    """Greedy generation of ``new_tokens`` per row through predict (the served path)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    params = {"temperature": 0.0, "max_tokens": workload.new_tokens, "return_usage": True}
    seconds, frame = _timed(lambda: loaded.pyfunc.predict(prompts, params=params), loaded.device,
                            workload.repeats)
    tokens = int(frame["completion_tokens"].sum())
    return {"seconds": round(seconds, 4), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def predict_prefill_seconds(loaded: Loaded, tokens: int, repeats: int) -> float:
    """One prompt of about ``tokens`` tokens through ``predict`` with ``max_tokens`` 1: prefill
    end to end (tokenizing, templating, the engine's or generate's prompt pass)."""
    words = loaded.tokenizer(" ".join(PROMPTS * tokens), add_special_tokens=False)["input_ids"][:tokens]
    prompt = loaded.tokenizer.decode(words)
    params = {"temperature": 0.0, "max_tokens": 1}
    return round(_timed(lambda: loaded.pyfunc.predict([prompt], params=params), loaded.device, repeats)[0], 5)


def plain_decode_tokens_per_s(model: Any, tokenizer: Any, texts: list[str], workload: Workload,
                              device: str) -> dict[str, Any]:
    """The same rendered prompts through transformers' own ``generate``, tokens counted alike."""
    batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}

    @torch.inference_mode()
    def run() -> torch.Tensor:
        return model.generate(**batch, max_new_tokens=workload.new_tokens, do_sample=False,
                              use_cache=True, pad_token_id=tokenizer.pad_token_id)

    seconds, out = _timed(run, device, workload.repeats)
    tokens = 0
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        ended = next((i for i, t in enumerate(row) if t in ends), None)
        tokens += len(row) if ended is None else ended + 1
    return {"seconds": round(seconds, 4), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def prefill_seconds(model: Any, tokens: int, vocab: int, device: str, repeats: int) -> float:
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def run() -> Any:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    return round(_timed(run, device, repeats)[0], 5)


def markdown(data: dict[str, Any]) -> str:
    env = data.get("environment", {})
    lines = [
        "# GPU check",
        "",
        f"{env.get('gpu', env.get('device', '?'))}; torch {env.get('torch')}, triton {env.get('triton')}, "
        f"transformers {env.get('transformers')}, mlflow {env.get('mlflow') or env.get('mlflow-skinny')}, "
        f"flash-attn {env.get('flash-attn') or 'not installed'}; {env.get('date', '')}. "
        f"Total {data.get('total_seconds', '?')} s.",
        "",
        "| backend | ran as | engine | f32 logits rel. err | f32 greedy = eager | bf16 err / eager's | "
        "bf16 greedy = eager | prefill s | prefill x eager | predict prefill x eager | "
        "decode b1 tok/s | decode b-max tok/s | b-max vs plain | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    plain = data.get("plain_transformers", {})
    for name, b in data.get("backends", {}).items():
        if "skipped" in b:
            lines.append(f"| {name} | skipped: {b['skipped']} |" + " |" * 12)
            continue
        decode = b.get("decode", {})
        big = decode.get(max(decode, key=int)) if decode else None
        plain_big = plain.get("decode", {}).get(max(decode, key=int)) if decode else None
        divergence = b.get("bf16_first_divergence")
        bf16_equal = b.get("bf16_greedy_equal")
        if bf16_equal is False and divergence:
            bf16_equal = f"no: step {divergence['step']}, eager gap {divergence['eager_logit_gap']}"
        cells = [
            name, b.get("ran_as", ""), _fmt(b.get("engine")), _fmt(b.get("f32_rel_error")),
            _fmt(b.get("f32_greedy_equal")), _fmt(b.get("bf16_error_over_eager")), _fmt(bf16_equal),
            _fmt(b.get("prefill_seconds")), _fmt(b.get("prefill_speedup_over_eager")),
            _fmt(b.get("predict_prefill_speedup_over_eager")), _fmt(decode.get("1", {}).get("tokens_per_s")),
            _fmt(big and big.get("tokens_per_s")),
            _fmt(big and plain_big and round(big["tokens_per_s"] / plain_big["tokens_per_s"], 2)),
            _fmt(b.get("peak_gib")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if plain:
        lines += ["", f"Plain transformers (eager, same snapshot): {json.dumps(plain)}"]
    for name, why in data.get("skipped", {}).items():
        lines.append(f"\nSkipped phase {name}: {why}")
    for name, phase in data.get("phases", {}).items():
        if "error" in phase:
            lines.append(f"\nPhase {name} failed: {phase['error']}")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
