"""The engine's budget: how many sequences run at once, how long each may be, how many may wait."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from templated_llm.host_memory import mem_available

# Tokens of prompt read per scheduler step (over all sequences being prefilled). Larger reads
# long prompts in fewer steps (lower time to first token); smaller keeps the running streams'
# steps short (lower time per output token). EngineConfig(prefill_chunk=...) changes it.
DEFAULT_PREFILL_CHUNK = 512
DEFAULT_MAX_WAITING = 256
# Which prompts a step reads first (see EngineConfig.prefill_order).
PrefillOrder = Literal["shortest", "arrival"]
PREFILL_ORDERS: tuple[str, ...] = get_args(PrefillOrder)
# Without a budget, each slot holds the model's context up to this many tokens, and the slots
# take at most this share of the memory available at load (as the memory check counts it: the
# tightest of MemAvailable, the cgroup's limit and TEMPLATED_LLM_MEMORY_LIMIT), and at most
# _DEFAULT_MAX_SEQS of them.
_DEFAULT_SLOT_CAP = 4096
_FREE_MEMORY_SHARE = 0.25
_DEFAULT_MAX_SEQS = 32


@dataclass(frozen=True)
class EngineConfig:
    """What the engine may hold. ``None`` fields are sized from the model and free memory.

    - ``max_num_seqs``: sequences generating at once (KV cache slots).
    - ``max_cache_tokens``: tokens the KV cache holds over all slots; each slot holds
      ``max_cache_tokens // max_num_seqs`` (at most the model's context): a request whose
      prompt plus ``max_tokens`` exceeds that is refused, never truncated.
    - ``max_waiting``: sequences queued for a slot; beyond it ``submit`` raises
      :class:`~templated_llm.errors.EngineFullError`.
    - ``prefill_chunk``: prompt tokens read per step (see ``DEFAULT_PREFILL_CHUNK``).
    - ``prefill_order``: which prompts take free slots and are read first when more wait than
      ``prefill_chunk`` covers. ``"shortest"`` (default): the one whose prompt would be read
      first were each alone, arrival time plus its unread tokens at the engine's measured
      prefill speed; requests that arrive together are read shortest first (a short prompt does
      not wait behind long ones), and one that arrived earlier by more than the difference in
      reading time goes first, so none waits forever. ``"arrival"``: strictly oldest first.
    """

    max_num_seqs: int | None = None
    max_cache_tokens: int | None = None
    max_waiting: int = DEFAULT_MAX_WAITING
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    prefill_order: PrefillOrder = "shortest"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_cache_tokens", "max_waiting", "prefill_chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"EngineConfig.{name} must be a positive integer; received {value!r}")
        if self.prefill_order not in PREFILL_ORDERS:
            raise ValueError(f"EngineConfig.prefill_order must be one of {', '.join(PREFILL_ORDERS)}; "
                             f"received {self.prefill_order!r}")


@dataclass(frozen=True)
class CacheShape:
    """The resolved budget: ``slots`` sequences of at most ``slot_len`` tokens each."""

    slots: int
    slot_len: int


def resolve(config: EngineConfig, context: int | None, bytes_per_token: int, device: str,
            free_memory: int | None = None) -> CacheShape:
    """Slots and slot length from ``config``, the model's context and the memory free now:
    ``free_memory``, the figure the caller's memory check used, else the system's."""
    longest = min(context or _DEFAULT_SLOT_CAP, _DEFAULT_SLOT_CAP)
    seqs, tokens = config.max_num_seqs, config.max_cache_tokens
    if seqs is not None and tokens is not None:
        return CacheShape(seqs, min(tokens // seqs, context or tokens) or 1)
    if tokens is not None:
        slot_len = min(longest, tokens)
        return CacheShape(max(1, tokens // slot_len), slot_len)
    if seqs is None:
        budget = (_free_memory(device) if free_memory is None else free_memory) * _FREE_MEMORY_SHARE
        seqs = int(max(1, min(_DEFAULT_MAX_SEQS, budget // (bytes_per_token * longest))))
    return CacheShape(seqs, longest)


def _free_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    available = mem_available()
    return 4 * 2**30 if available is None else available  # no /proc (macOS, Windows): assume 4 GiB
