"""``python -m benchmarks --size``: a model at real size, in the dtype ``auto`` picks, against the
machine's own limit.

For each section (a snapshot and the dtypes TemplatedLLM runs it in), one run measures: ``log_llm``
wall time against a plain copy of the snapshot and the models it loads (0 expected); load time and
peak RSS over the weights' bytes at the dtype loaded; decode tokens/s at batch 1 and 16 and prefill
tokens/s at 512 tokens, for TemplatedLLM and plain transformers in the same dtype and threads; what
the memory check says of the dtypes not run. Once per run, the machine's memory read bandwidth (a
reduction over a tensor far larger than the caches) gives the physical limit of batch-1 decode:
every step reads every weight once, so tokens/s <= bandwidth / weight bytes.

Sizes: ``mpt-7b`` (mosaicml/mpt-7b-instruct's exact configuration, built once as bf16 ``.bin``
shards like the Hub's; about 40 GB of free disk and 18 GB of free memory) with the 25M model in
bf16 and float32; ``mpt-7b-scaled`` (the same architecture and layout at d_model 1024 and 8 layers,
0.3 GB); ``25m`` (the 25M model alone); ``smoke`` (tiny, checks the harness).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.utils.file_utils import local_file_uri_to_path

from benchmarks import big_snapshot
from benchmarks.big_snapshot import MPT_7B, MptShape
from benchmarks.contenders import MODEL
from benchmarks.figures import counted_loads, machine
from benchmarks.full_size_report import markdown
from templated_llm.devtools.tiny import build_tiny_mpt
from templated_llm.engine import EngineConfig
from templated_llm.errors import InsufficientMemoryError
from templated_llm.model_logging.config import LoggedConfig
from templated_llm.model_logging.log import log_llm
from templated_llm.runtime.device import DTypeChoice, choose_dtype
from templated_llm.runtime.memory import check_load, weight_bytes
from templated_llm.runtime.tracing import TRACING_ENV, setting

REPO = Path(__file__).resolve().parents[1]
# Tokens of KV cache per engine slot: the benchmark's rendered prompts and new tokens fit.
_SLOT_TOKENS = 256


@dataclass(frozen=True)
class Workload:
    new_tokens: int = 16
    repeats: int = 3
    batches: tuple[int, ...] = (1, 16)
    prefill_tokens: int = 512
    log_repeats: int = 3


@dataclass(frozen=True)
class Section:
    title: str
    shape: MptShape
    dtypes: tuple[str, ...]  # TemplatedLLM's, each also run by plain transformers
    workload: Workload
    # One process per contender: two 7B models do not fit beside each other in 24 GiB.
    process_per_contender: bool = False


_25M = MptShape(d_model=512, n_layers=8, n_heads=8, vocab_size=1024, shard_bytes=30 * 10**6)
SECTION_25M = Section("25M-parameter MPT (the benchmark's model), bf16 checkpoint", _25M,
                      ("auto", "float32"), Workload(new_tokens=32, repeats=5))
SIZES: dict[str, list[Section]] = {
    "mpt-7b": [Section("mpt-7b-instruct's configuration (6.65B parameters, bf16 checkpoint)", MPT_7B,
                       ("auto",), Workload(repeats=3), process_per_contender=True),
               SECTION_25M],
    "mpt-7b-scaled": [Section("mpt-7b-instruct's architecture and layout at d_model 1024, 8 layers",
                              MptShape(1024, 8, 16, shard_bytes=200 * 10**6), ("auto",),
                              Workload(new_tokens=16, repeats=5), process_per_contender=True)],
    "25m": [SECTION_25M],
    "smoke": [Section("smoke: mpt-7b-instruct's layout, tiny", MptShape(64, 2, 4, shard_bytes=4 * 10**6),
                      ("auto",), Workload(4, 1, (1, 2), 32, 2), process_per_contender=True),
              Section("smoke: both dtypes, tiny", MptShape(64, 2, 4, vocab_size=1024, shard_bytes=10**6),
                      ("auto", "float32"), Workload(4, 1, (1, 2), 32, 1))],
}
TARGETS = {"log_over_copy": 1.1, "load_peak_rss_over_weights": 1.1, "batch_1_share_of_limit": 0.70,
           "templated_over_plain_batch_16_bf16": 1.3, "bf16_over_float32_batch_16": 2.0}


def _say(message: str) -> None:
    print(f"[bench --size] {message}", flush=True)


def memory_bandwidth(gib: float, repeats: int = 5) -> dict[str, Any]:
    """Read bandwidth: the fastest of ``repeats`` sums of a float32 tensor of ``gib`` GiB, far
    larger than any cache, with torch's threads (the model's). The fastest, as what the machine
    can do: other processes only slow a run down, and a lower figure would flatter the share of
    the limit that decode reaches."""
    data = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return {"bytes_per_s": data.nbytes / min(times), "tensor_bytes": data.nbytes,
            "seconds": times}


def _warm_read(snapshot: Path) -> None:
    for file in snapshot.iterdir():
        with file.open("rb") as f:
            while f.read(64 * 2**20):
                pass


def _engine_budget(workload: Workload) -> EngineConfig:
    """One engine slot per row of the largest batch, each long enough for the benchmark's
    prompts and new tokens: sized from free memory instead, a 7B model on a 24 GiB machine
    would get two slots, and batch 16 would run two rows at a time."""
    rows = max(workload.batches)
    return EngineConfig(max_num_seqs=rows, max_cache_tokens=rows * _SLOT_TOKENS)


def log_versus_copy(snapshot: Path, dtype: str, engine: EngineConfig, repeats: int) -> dict[str, Any]:
    """``log_llm`` and ``shutil.copytree`` of the snapshot, taking turns; the models loaded while
    logging are counted. Returns the last logged model's URI too (the last step is a log).

    Every step starts from the same state: the snapshot read into the page cache, the earlier
    steps' output deleted and nothing left to write back. At 7B the snapshot and its copy do not
    both fit in memory, so a copy kept in the cache (or gigabytes of dirty pages) slows whichever
    step comes next, and by different amounts in each order.
    """
    order = [step for round_ in range(repeats)
             for step in (("copy", "log") if (repeats - 1 - round_) % 2 == 0 else ("log", "copy"))]
    logs, copies, loads, info = [], [], 0, None
    with tempfile.TemporaryDirectory(dir=snapshot.parent) as scratch:
        for index, step in enumerate(order):
            _warm_read(snapshot)
            os.sync()
            start = time.perf_counter()
            if step == "copy":
                shutil.copytree(snapshot, Path(scratch) / "copy")
                copies.append(time.perf_counter() - start)
                shutil.rmtree(Path(scratch) / "copy")
                continue
            with counted_loads() as calls:
                info = log_llm(MODEL, snapshot=snapshot, name="timed", dtype=dtype, engine=engine)
            logs.append(time.perf_counter() - start)
            loads += len(calls)
            if index < len(order) - 1:
                _delete_logged(info.model_id)  # the run loads only the last; 7B copies fill disks
    return {"log_seconds": logs, "copy_seconds": copies, "loads": loads, "model_uri": info.model_uri,
            "ratio": statistics.median(logs) / statistics.median(copies)}


def _delete_logged(model_id: str) -> None:
    """Delete a logged model's files from the (local) benchmark store."""
    shutil.rmtree(local_file_uri_to_path(mlflow.get_logged_model(model_id).artifact_location))


def _memory_verdicts(snapshot: Path, engine: EngineConfig) -> dict[str, str]:
    """What the memory check says of loading the snapshot in each dtype here, now, with the
    benchmark's engine budget."""
    config = LoggedConfig(model=MODEL, plugin=MODEL, plugin_module="templated_llm_mpt",
                          max_num_seqs=engine.max_num_seqs, max_cache_tokens=engine.max_cache_tokens)
    verdicts = {}
    for name in ("float32", "bfloat16"):
        try:
            check_load(snapshot, config, DTypeChoice(name, "benchmark"), "cpu")
            verdicts[name] = "fits"
        except InsufficientMemoryError as refused:
            verdicts[name] = f"refused: {refused}"
    return verdicts


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.size_worker", json.dumps(spec)],
        capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )
    if result.returncode != 0:
        raise RuntimeError(f"benchmark worker failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["contenders"]


def run_section(section: Section, cache: Path, warmup_uri: str) -> dict[str, Any]:
    _say(f"{section.title}: snapshot")
    snapshot = big_snapshot.build(section.shape, cache)
    auto = choose_dtype("auto", "cpu", snapshot)
    resolved = {d: auto.name if d == "auto" else d for d in section.dtypes}
    _say("log_llm against a copy")
    engine = _engine_budget(section.workload)
    log = log_versus_copy(snapshot, section.dtypes[0], engine, section.workload.log_repeats)
    contenders = {}
    for requested, dtype in resolved.items():
        uri = log["model_uri"] if requested == section.dtypes[0] else log_llm(
            MODEL, snapshot=snapshot, name=f"templated-{requested}", dtype=requested, engine=engine).model_uri
        contenders[f"templated_{requested}"] = {"kind": "templated", "model_uri": uri, "dtype": dtype}
        contenders[f"plain_{dtype}"] = {"kind": "plain", "dtype": dtype}  # once per dtype
    contenders = [{"name": name, **c} for name, c in contenders.items()]
    workload = section.workload
    spec = {"snapshot": str(snapshot), "warmup_uri": warmup_uri,
            "batches": list(workload.batches), "new_tokens": workload.new_tokens,
            "prefill_tokens": workload.prefill_tokens, "repeats": workload.repeats}
    measured = {}
    for group in ([[c] for c in contenders] if section.process_per_contender else [contenders]):
        _say(f"measuring {', '.join(c['name'] for c in group)}")
        measured.update(_worker({**spec, "contenders": group}))
    for name, result in measured.items():
        weights = weight_bytes(snapshot, getattr(torch, result["dtype"]))
        result.update(weight_bytes=weights, load_peak_rss_over_weights=(
            result["load_peak_bytes"] - result["engine_cache_bytes"]) / weights)
    # The snapshot by its name in the cache: results name no paths of the machine they ran on.
    return {"title": section.title, "shape": asdict(section.shape), "snapshot": snapshot.name,
            # Every tensor of these snapshots is a floating-point weight.
            "parameters": weight_bytes(snapshot, torch.bfloat16) // 2, "workload": asdict(workload),
            "auto": {"chose": auto.name, "reason": auto.reason}, "dtypes": resolved,
            "memory_check": _memory_verdicts(snapshot, engine), "log": log, "contenders": measured}


def run(size: str, cache: Path) -> dict[str, Any]:
    """Every section of ``size``; torch's threads are ``python -m benchmarks --threads`` (its
    OMP_NUM_THREADS, which the worker processes inherit)."""
    sections = SIZES[size]
    _say("memory bandwidth")
    biggest = max(s.shape.d_model for s in sections)
    bandwidth = memory_bandwidth(gib=2.0 if biggest >= 1024 else 0.5)
    warm = cache / "warm-up-tiny-mpt"
    if not (warm / "config.json").is_file():
        build_tiny_mpt(warm)
    warmup_uri = log_llm(MODEL, snapshot=warm, name="warm-up").model_uri
    results = {"size": size, "machine": machine(""), "memory_bandwidth": bandwidth, "targets": TARGETS,
               "traced": setting(TRACING_ENV, True),  # log_llm traces by default; the run's env may not
               "sections": [run_section(s, cache, warmup_uri) for s in sections]}
    for section in results["sections"]:
        _figures(section, bandwidth["bytes_per_s"])
    return results


def _rate(section: dict[str, Any], name: str, key: str) -> float | None:
    return section["contenders"][name][key]["tokens_per_s"]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def _figures(section: dict[str, Any], bandwidth: float) -> None:
    """The ratios the targets are about, computed from the section's measurements."""
    figures = section["figures"] = {"log_over_copy": section["log"]["ratio"],
                                    "loads_during_log": section["log"]["loads"]}
    batch = f"decode_batch_{section['workload']['batches'][-1]}"
    for requested, dtype in section["dtypes"].items():
        ours, plain = f"templated_{requested}", f"plain_{dtype}"
        contender = section["contenders"][ours]
        limit = bandwidth / contender["weight_bytes"]
        figures[requested] = {
            "dtype": dtype,
            "load_peak_rss_over_weights": contender["load_peak_rss_over_weights"],
            "batch_1_limit_tokens_per_s": limit,
            "batch_1_share_of_limit": _ratio(_rate(section, ours, "decode_batch_1"), limit),
            "templated_over_plain_last_batch": _ratio(_rate(section, ours, batch), _rate(section, plain, batch)),
        }
    if set(section["dtypes"].values()) == {"bfloat16", "float32"}:
        bf16 = next(r for r, d in section["dtypes"].items() if d == "bfloat16")
        figures["bf16_over_float32_last_batch"] = _ratio(_rate(section, f"templated_{bf16}", batch),
                                                         _rate(section, "templated_float32", batch))


def write(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"full-size-{results['size']}.json").write_text(json.dumps(results, indent=2) + "\n")
    path = out / f"full-size-{results['size']}.md"
    path.write_text(markdown(results))
    return path
