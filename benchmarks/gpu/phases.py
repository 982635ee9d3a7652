"""The order of the GPU check: build, tiny float32 parity, medium bf16 parity and speed, plain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import torch

from benchmarks.gpu.check import (
    BF16_EAGER_FACTOR,
    BF16_REL_SLACK,
    F32_REL_TOLERANCE,
    GPU_WORKLOAD,
    MEDIUM,
    PROMPTS,
    SMOKE_MEDIUM,
    SMOKE_WORKLOAD,
    TINY,
    Loaded,
    Report,
    Workload,
    build_snapshot,
    decode_tokens_per_s,
    first_divergence,
    plain_decode_tokens_per_s,
    predict_prefill_seconds,
    prefill_seconds,
    relative_error,
)

_PARITY_TOKENS = 16


def run(report: Report, work: Path, device: str, backends: list[str], *, smoke: bool, medium: bool) -> None:
    work.mkdir(parents=True, exist_ok=True)
    _use_store(work)
    if device == "cpu" and "triton" in backends and smoke:
        # flex_attention compiles to C++ on CPU, tens of seconds per shape: not a smoke test.
        backends = [b for b in backends if b != "triton"]
        report.data["skipped"]["triton"] = "CPU smoke: flex_attention compiles tens of seconds per shape on CPU"
    workload = SMOKE_WORKLOAD if smoke else GPU_WORKLOAD
    size = SMOKE_MEDIUM if smoke else MEDIUM
    with report.phase("build") as go:
        if go:
            tiny = build_snapshot(work / "tiny", TINY, device, torch.float32)
            big = build_snapshot(work / "medium", size, device, torch.bfloat16) if medium else None
            report.data["medium_parameters"] = size.parameters if medium else None
    if "build" not in report.data["phases"] or "error" in report.data["phases"]["build"]:
        return
    with report.phase("tiny_float32_parity", needs_s=20) as go:
        if go:
            accepted = _log_each(report, tiny, backends)
            _tiny_parity(report, accepted, device)
    if big is None:
        return
    accepted = [b for b in backends if "skipped" not in report.backend(b)]
    from templated_llm.model_logging.log import log_llm

    with report.phase("medium_log", needs_s=30) as go:
        if not go:
            return
        uri = log_llm("mpt-instruct", snapshot=big, attention="auto", dtype="bfloat16").model_uri
    reference = None
    with report.phase("medium_float32_reference", needs_s=30) as go:
        if go:
            loaded = Loaded(uri, "eager", "float32", device)
            batch = loaded.encode(PROMPTS)
            reference = loaded.logits(batch)
            loaded.close()
    eager: dict[str, Any] = {}
    # Eager first (the reference), triton last: it compiles every new shape, and a run that
    # runs out of budget should lose the fewest figures.
    order = sorted(accepted, key=lambda b: (b != "eager", b == "triton"))
    for backend in order:
        if backend == "triton" and "texts" in eager:
            _plain_phase(report, big, device, workload, eager)
        with report.phase(f"medium_bf16_{backend}", needs_s=40) as go:
            if go:
                _medium_backend(report, uri, backend, device, workload, reference, eager)
    tried = {**report.data["phases"], **report.data["skipped"]}
    if "texts" in eager and "plain_transformers" not in tried:
        _plain_phase(report, big, device, workload, eager)
    _compare_with_plain(report)
    report.save()


def _plain_phase(report: Report, snapshot: Path, device: str, workload: Workload, eager: dict[str, Any]) -> None:
    with report.phase("plain_transformers", needs_s=30) as go:
        if go:
            _plain(report, snapshot, device, workload, eager)


def _use_store(work: Path) -> None:
    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    name = "gpu-check"
    experiment = mlflow.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(
        name, artifact_location=(work / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)


def _log_each(report: Report, snapshot: Path, backends: list[str]) -> dict[str, str]:
    """Log the tiny model once per backend: what ``log_llm`` refuses here is skipped, with why."""
    from templated_llm import AttentionUnavailableError
    from templated_llm.model_logging.log import log_llm

    accepted = {}
    for backend in backends:
        try:
            accepted[backend] = log_llm("mpt-instruct", snapshot=snapshot, attention=backend,
                                        dtype="float32").model_uri
        except AttentionUnavailableError as exc:
            report.backend(backend)["skipped"] = str(exc)
    return accepted


def _tiny_parity(report: Report, uris: dict[str, str], device: str) -> None:
    if "eager" not in uris:
        report.data["skipped"]["tiny_parity"] = "eager, the reference, is not among the backends"
        return
    reference = Loaded(uris["eager"], "eager", "float32", device)
    batch = reference.encode(PROMPTS)
    ref_logits, ref_texts = reference.logits(batch), reference.greedy_texts(_PARITY_TOKENS)
    reference.close()
    for backend, uri in uris.items():
        entry = report.backend(backend)
        if backend == "flash":  # flash-attn runs in float16/bfloat16 only: checked on the medium model
            entry["f32_note"] = "flash-attn has no float32 kernels"
            continue
        loaded = Loaded(uri, backend, "float32", device)
        error = relative_error(loaded.logits(batch), ref_logits)
        entry.update(ran_as=loaded.attention, f32_rel_error=error, f32_within_tolerance=error <= F32_REL_TOLERANCE,
                     f32_greedy_equal=loaded.greedy_texts(_PARITY_TOKENS) == ref_texts)
        loaded.close()


def _medium_backend(report: Report, uri: str, backend: str, device: str, workload: Workload,
                    reference: Any, eager: dict[str, Any]) -> None:
    entry = report.backend(backend)
    loaded = Loaded(uri, backend, "bfloat16", device)
    entry["ran_as"] = loaded.attention
    batch = loaded.encode(PROMPTS)
    if reference is not None:
        entry["bf16_rel_error"] = relative_error(loaded.logits(batch), reference)
    ids, logits = loaded.greedy_steps(batch, _PARITY_TOKENS)
    texts = loaded.greedy_texts(_PARITY_TOKENS)
    if backend == "eager":
        eager.update(ids=ids, logits=logits, texts=texts, error=entry.get("bf16_rel_error"),
                     rendered=loaded.python_model.render(PROMPTS))
    else:
        if eager.get("error"):
            ratio = entry["bf16_rel_error"] / eager["error"]
            entry["bf16_error_over_eager"] = ratio
            entry["bf16_within_tolerance"] = (
                entry["bf16_rel_error"] <= BF16_EAGER_FACTOR * eager["error"] + BF16_REL_SLACK)
        if "ids" in eager:
            entry["bf16_greedy_equal"] = texts == eager["texts"]
            entry["bf16_first_divergence"] = first_divergence(ids, eager["ids"], eager["logits"])
    vocab = loaded.model.config.vocab_size
    entry["prefill_seconds"] = prefill_seconds(loaded.model, workload.prefill_tokens, vocab, device,
                                               workload.repeats)
    if backend == "eager":
        eager["prefill_seconds"] = entry["prefill_seconds"]
    elif eager.get("prefill_seconds"):
        entry["prefill_speedup_over_eager"] = round(eager["prefill_seconds"] / entry["prefill_seconds"], 3)
    entry["predict_prefill_seconds"] = predict_prefill_seconds(
        loaded, workload.prefill_tokens * 7 // 8, workload.repeats)  # room for the template
    if backend == "eager":
        eager["predict_prefill_seconds"] = entry["predict_prefill_seconds"]
    elif eager.get("predict_prefill_seconds"):
        entry["predict_prefill_speedup_over_eager"] = round(
            eager["predict_prefill_seconds"] / entry["predict_prefill_seconds"], 3)
    engine = loaded.python_model.engine
    entry["engine"] = engine is not None
    if engine is not None:
        entry["engine_slots"] = [engine.max_num_seqs, engine.max_seq_len]
    entry["decode"] = {str(b): decode_tokens_per_s(loaded, b, workload) for b in workload.decode_batches}
    entry["peak_gib"] = loaded.peak_gib()
    loaded.close()
    if backend == "auto":
        _whole_batch(report, uri, device, workload, texts)


def _whole_batch(report: Report, uri: str, device: str, workload: Workload, engine_texts: list[str]) -> None:
    """The default backend without the engine: transformers' generate over whole batches."""
    entry = report.backend("auto, whole-batch generate")
    loaded = Loaded(uri, "auto", "bfloat16", device, engine=False)
    entry.update(ran_as=loaded.attention, engine=False,
                 greedy_equal_to_engine=loaded.greedy_texts(_PARITY_TOKENS) == engine_texts,
                 decode={str(b): decode_tokens_per_s(loaded, b, workload) for b in workload.decode_batches},
                 peak_gib=loaded.peak_gib())
    loaded.close()


def _plain(report: Report, snapshot: Path, device: str, workload: Workload, eager: dict[str, Any]) -> None:
    from transformers import AutoTokenizer, MptForCausalLM

    from templated_llm.runtime.tokens import prepare_tokenizer

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    model = MptForCausalLM.from_pretrained(snapshot, dtype=torch.bfloat16, device_map=device).eval()
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(snapshot))
    rendered = eager["rendered"]
    plain: dict[str, Any] = {
        "prefill_seconds": prefill_seconds(model, workload.prefill_tokens, model.config.vocab_size, device,
                                           workload.repeats),
        "decode": {str(b): plain_decode_tokens_per_s(
            model, tokenizer, [rendered[i % len(rendered)] for i in range(b)], workload, device)
            for b in workload.decode_batches},
    }
    if device.startswith("cuda"):
        plain["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    report.data["plain_transformers"] = plain


def _compare_with_plain(report: Report) -> None:
    plain = report.data.get("plain_transformers")
    if not plain:
        return
    best: dict[str, tuple[float, str]] = {}
    for name, entry in report.data["backends"].items():
        for batch, figures in entry.get("decode", {}).items():
            ratio = round(figures["tokens_per_s"] / plain["decode"][batch]["tokens_per_s"], 3)
            entry.setdefault("decode_vs_plain", {})[batch] = ratio
            if ratio > best.get(batch, (0.0, ""))[0]:
                best[batch] = (ratio, name)
    report.data["best_decode_vs_plain"] = best
