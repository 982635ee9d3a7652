"""Whether a model fits before it loads: the bytes it needs, the bytes available, the check.

The need is the weights at the dtype chosen (counted from the safetensors headers or the
``.bin`` files' tensor metadata, no weight read), the KV cache budget, and a margin. What is
available is the GPU's free memory on CUDA; on CPU, the host's MemAvailable, lowered by a cgroup
limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) or by ``TEMPLATED_LLM_MEMORY_LIMIT``.
A model that does not fit is refused with what to change, instead of being left to the
kernel's out-of-memory killer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from templated_llm.engine.config import resolve
from templated_llm.errors import InsufficientMemoryError
from templated_llm.host_memory import mem_available
from templated_llm.model_logging.config import LoggedConfig
from templated_llm.model_logging.snapshot import weight_files
from templated_llm.runtime.batching import MAX_MERGED_TOKENS
from templated_llm.runtime.device import DTypeChoice, cpu_native_flag, dtype_unavailable
from templated_llm.runtime.tokens import context_length

#: Caps the memory this process may use (bytes, or with a unit: ``20GB``, ``512MiB``).
MEMORY_LIMIT_ENV = "TEMPLATED_LLM_MEMORY_LIMIT"
# Activations, the load's transient copies (up to 10% of the weights) and the runtime's own.
_MARGIN_FRACTION = 0.10
_MARGIN_BYTES = 512 * 2**20
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs loaded: weights, KV cache and margin."""

    weights: int
    cache: int
    cache_tokens: int
    margin: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.margin

    def describe(self) -> str:
        return (f"{_gb(self.total)} ({_gb(self.weights)} of weights, {_gb(self.cache)} of KV cache "
                f"for {self.cache_tokens} tokens, {_gb(self.margin)} of margin)")


@dataclass(frozen=True)
class AvailableMemory:
    bytes: int
    source: str


def _gb(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count < 10e9 else f"{count / 1e9:.1f} GB"


def _tensor_sizes(path: Path) -> list[tuple[int, torch.dtype | None, int]]:
    """(element count, floating dtype or None, bytes) of every tensor in a weights file,
    from its metadata: the safetensors header, or a ``.bin`` mapped, not read."""
    if path.suffix == ".safetensors":
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        sizes = []
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                start, end = info["data_offsets"]
                sizes.append((count, _SAFETENSORS_DTYPES.get(info["dtype"]), end - start))
        return sizes
    tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return [(t.numel(), t.dtype if t.is_floating_point() else None, t.nbytes)
            for t in tensors.values() if isinstance(t, torch.Tensor)]


def weight_bytes(snapshot: Path, dtype: torch.dtype) -> int:
    """Bytes of the snapshot's weights once loaded in ``dtype`` (floating tensors converted)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(count * size if floating is not None else stored
               for path in weight_files(Path(snapshot))
               for count, floating, stored in _tensor_sizes(path))


def _config(snapshot: Path) -> SimpleNamespace:
    try:
        values = json.loads((Path(snapshot) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        values = {}
    return SimpleNamespace(**values) if isinstance(values, dict) else SimpleNamespace()


def _first(config: SimpleNamespace, *names: str) -> int | None:
    return next((v for n in names if isinstance(v := getattr(config, n, None), int) and v > 0), None)


def cache_bytes_per_token(snapshot: Path, dtype: torch.dtype) -> int | None:
    """Bytes of KV cache one token takes (keys and values of every layer), from config.json;
    ``None`` when the config does not say enough."""
    config = _config(snapshot)
    layers = _first(config, "num_hidden_layers", "n_layers", "n_layer", "num_layers")
    hidden = _first(config, "hidden_size", "d_model", "n_embd")
    heads = _first(config, "num_attention_heads", "n_heads", "n_head")
    if not (layers and hidden and heads):
        return None
    kv_heads = _first(config, "num_key_value_heads") or heads
    head_dim = _first(config, "head_dim") or hidden // heads
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def snapshot_context_length(snapshot: Path) -> int | None:
    """The longest sequence the snapshot's model accepts, from its config.json."""
    return context_length(SimpleNamespace(config=_config(snapshot)))


def estimate_load_bytes(snapshot: Path, dtype: torch.dtype, cache_tokens: int) -> MemoryEstimate:
    """What loading the snapshot in ``dtype`` with a KV cache of ``cache_tokens`` tokens needs."""
    weights = weight_bytes(snapshot, dtype)
    cache = cache_tokens * (cache_bytes_per_token(snapshot, dtype) or 0)
    return MemoryEstimate(weights, cache, cache_tokens, int(weights * _MARGIN_FRACTION) + _MARGIN_BYTES)


def parse_bytes(text: str) -> int:
    """``"20GB"``, ``"512 MiB"`` or ``"1000000"`` as a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"{MEMORY_LIMIT_ENV}={text!r} is not a size; write bytes, or a number "
                         f"with a unit such as 20GB or 512MiB ({', '.join(sorted(_UNITS)[1:])})")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # v2 writes "max" for no limit


def _cgroup_stat(path: Path, field: str) -> int:
    try:
        text = path.read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field} (\d+)$", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _cgroup_available(root: Path = _CGROUP, membership: Path = Path("/proc/self/cgroup")
                      ) -> AvailableMemory | None:
    """What this process's cgroup (v2 or v1) lets it still use: the tightest limit on the way
    from its cgroup up to the root, less what the cgroup uses (reclaimable file cache not)."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base, files = root, ("memory.max", "memory.current", "memory.stat", "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            base = root / "memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat",
                     "total_inactive_file")
        else:
            continue
        directory = base / path.lstrip("/")
        while True:
            limit = _read_int(directory / files[0])
            if limit is not None and limit < 2**60:
                usage = _read_int(directory / files[1]) or 0
                free = limit - usage + _cgroup_stat(directory / files[2], files[3])
                found.append(AvailableMemory(
                    free, f"the cgroup limit {_gb(limit)} ({directory / files[0]}) less its use"))
            if directory == base or not directory.is_relative_to(base):
                break
            directory = directory.parent
    return min(found, key=lambda a: a.bytes, default=None)


def _mem_available() -> AvailableMemory | None:
    available = mem_available()
    return None if available is None else AvailableMemory(available, "MemAvailable")


def _env_available() -> AvailableMemory | None:
    text = os.environ.get(MEMORY_LIMIT_ENV)
    if not text:
        return None
    used = 0
    try:
        status = Path("/proc/self/status").read_text()
        used = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024
    except (OSError, AttributeError):
        pass
    return AvailableMemory(parse_bytes(text) - used, f"{MEMORY_LIMIT_ENV}={text} less this process's use")


def available_memory(device: str) -> AvailableMemory | None:
    """The memory a model loaded now on ``device`` may take, and where the figure comes from;
    ``None`` where this system does not say."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return AvailableMemory(free, f"free memory of {torch.cuda.get_device_name(device)}")
    candidates = [a for a in (_mem_available(), _cgroup_available(), _env_available()) if a is not None]
    return min(candidates, key=lambda a: a.bytes, default=None)


def _refusal(what: str, estimate: MemoryEstimate, available: AvailableMemory, changes: list[str]) -> str:
    to_fit = ("log it (or load it, through model_config) with " + ", or with ".join(changes) + ", or "
              if changes else "")
    return (f"{what} needs about {estimate.describe()}; {_gb(max(available.bytes, 0))} is available "
            f"({available.source}). Not loading it, to spare the process the out-of-memory killer. "
            f"To fit, {to_fit}use a machine with more memory.")


def _counted_cache_tokens(config: LoggedConfig, context: int | None, per_token: int | None,
                          device: str) -> int:
    """The KV cache tokens the check counts: on the engine, its budget, or one slot when the
    engine is to size itself from the memory free after the load (it takes a share of that);
    for whole batches, ``max_cache_tokens``, or one row at the full context."""
    if not config.engine:
        return config.max_cache_tokens or context or 0
    engine = config.engine_config()
    if engine.max_num_seqs is None and engine.max_cache_tokens is None:
        engine = dataclasses.replace(engine, max_num_seqs=1)
    shape = resolve(engine, context, per_token or 1, device)
    return shape.slots * shape.slot_len


def check_load(snapshot: Path, config: LoggedConfig, choice: DTypeChoice, device: str) -> int | None:
    """Check that the logged model fits before any weight is read: weights at ``choice``'s dtype,
    the KV cache the engine's budget holds (``max_cache_tokens``, ``max_num_seqs``; at least one
    sequence at the full context), and a margin, against :func:`available_memory`; raise
    :class:`InsufficientMemoryError` saying what to change where it does not fit.

    Returns the KV cache budget, in tokens, of a whole batch where the model generates without the
    engine: ``max_cache_tokens``, or what the memory left after the weights and margin holds, at
    most the largest batch the logged limits allow (a merged batch's ``MAX_MERGED_TOKENS``, or one
    request of ``max_rows_per_request`` rows at the full context). ``None``: no budget (the config
    does not say what a token of cache costs, or the system what is available).

    Public for whatever starts a model (a server, a process pool) and wants the answer first.
    """
    dtype = choice.torch_dtype
    per_token = cache_bytes_per_token(snapshot, dtype)
    context = snapshot_context_length(snapshot)
    counted = _counted_cache_tokens(config, context, per_token, device)
    estimate = estimate_load_bytes(snapshot, dtype, counted)
    available = available_memory(device)
    if available is not None and estimate.total > available.bytes:
        seqs = config.engine_config().max_num_seqs if config.engine else None
        raise InsufficientMemoryError(_refusal(
            f"model {config.model!r} in {choice.name} on {device}", estimate, available,
            _changes(snapshot, choice, device, config.max_cache_tokens, seqs, counted, context, per_token,
                     available.bytes)))
    if config.max_cache_tokens is not None or per_token is None:
        return config.max_cache_tokens
    limits = [max(MAX_MERGED_TOKENS, config.max_rows_per_request * context)] if context else []
    if available is not None:
        limits.append((available.bytes - estimate.weights - estimate.margin) // per_token)
    return min(limits, default=None)


def _changes(snapshot: Path, choice: DTypeChoice, device: str, cache_tokens: int | None, seqs: int | None,
             counted: int, context: int | None, per_token: int | None, available: int) -> list[str]:
    """The changes that would make the model fit ``available`` bytes: only those (alone, or the
    dtype and the cache together)."""
    changes, smaller_dtype = [], None
    for smaller in ("bfloat16", "float16"):
        if choice.name == "float32" and dtype_unavailable(smaller, device) is None:
            smaller_dtype = smaller
            break
    smaller_fits = False
    if smaller_dtype is not None:
        smaller = estimate_load_bytes(snapshot, getattr(torch, smaller_dtype), counted)
        smaller_fits = smaller.total <= available
        if smaller_fits:
            emulated = device == "cpu" and cpu_native_flag(smaller_dtype) is None
            changes.append(f"dtype='{smaller_dtype}' ({_gb(smaller.weights)} of weights"
                           f"{'; emulated on this CPU, slower' if emulated else ''})")
    if not per_token:
        return changes
    bare = estimate_load_bytes(snapshot, choice.torch_dtype, 0)
    fits = (available - bare.total) // per_token  # cache tokens the memory left holds
    if fits >= 1:
        if seqs and not cache_tokens:
            # The sequences set the cache: each holds the whole context.
            changes.append(f"fewer max_num_seqs ({seqs} now, each holding the {context}-token context: "
                           f"{counted} tokens; each token takes {per_token / 1e6:.3g} MB) or a "
                           f"max_cache_tokens of at most {fits}")
        else:
            now = f"{cache_tokens} now" if cache_tokens else f"unset, so one sequence of the {context}-token context"
            changes.append(f"a max_cache_tokens of at most {fits} ({now}; each token takes {per_token / 1e6:.3g} MB)")
    elif smaller_dtype is not None and not smaller_fits:
        half = estimate_load_bytes(snapshot, getattr(torch, smaller_dtype), 0)
        per_half = cache_bytes_per_token(snapshot, getattr(torch, smaller_dtype)) or per_token
        if (both := (available - half.total) // per_half) >= 1:
            changes.append(f"dtype='{smaller_dtype}' together with a max_cache_tokens of at most {both}")
    return changes
