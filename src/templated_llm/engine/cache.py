"""The KV cache: one preallocated slot per running sequence, and the rows of one forward pass.

Keys and values live in two tensors of shape (layers, slots, kv_heads, slot_len, head_dim),
allocated once (zeroed: a masked key still multiplies its value by a zero weight, and 0 * NaN
from uninitialised memory would be NaN). The scheduler keeps the decoding sequences in slots
``0..n-1``, so a decode step reads the view ``k[layer, :n, :, :longest]`` with no gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepBatch:
    """The rows of one forward pass: each row continues one sequence in one slot.

    ``tokens`` (rows, q) is right-padded; row ``r`` feeds ``lengths[r]`` tokens at positions
    ``starts[r]...`` (its padding repeats its last position). Decode steps use slots
    ``0..rows-1``; prefill rows may be any slots.
    """

    tokens: torch.Tensor
    slots: list[int]
    starts: list[int]
    lengths: list[int]

    def __post_init__(self) -> None:
        device = self.tokens.device
        self.rows, self.q_len = self.tokens.shape
        # Each row's keys once this pass has written its tokens.
        self.key_lengths = [s + n for s, n in zip(self.starts, self.lengths)]
        self.kv_len = max(self.key_lengths)
        self.start_index = torch.tensor(self.starts, device=device)
        self.last = torch.tensor(self.lengths, device=device) - 1
        # A padding query takes its row's last real position: never a position past the row's
        # tokens (rotary scalings such as dynamic NTK rescale a whole pass from the largest
        # position in it), and it sees only keys written. Its output is discarded.
        steps = torch.minimum(torch.arange(self.q_len, device=device), self.last[:, None])
        self.positions = self.start_index[:, None] + steps
        first = self.slots[0]
        self.contiguous = self.slots == list(range(first, first + self.rows))
        self.slot_index = torch.tensor(self.slots, device=device)

    def visible(self, window: int | None = None) -> torch.Tensor:
        """(rows, 1, q, kv) booleans, True where a query may attend a key: causal, and within
        the written part of the row's slot; ``window`` keeps only the last ``window`` keys."""
        keys = torch.arange(self.kv_len, device=self.tokens.device)
        seen = keys <= self.positions[..., None]
        if window is not None:
            seen &= keys > self.positions[..., None] - window
        return seen[:, None]


class SlotCache:
    """Keys and values of ``slots`` sequences of up to ``slot_len`` tokens each."""

    def __init__(self, layers: int, slots: int, kv_heads: int, slot_len: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device) -> None:
        shape = (layers, slots, kv_heads, slot_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.slot_len = slots, slot_len

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def update(self, layer: int, batch: StepBatch, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's keys and values (rows, kv_heads, q, head_dim) at each row's positions
        and return the keys and values its rows attend: (rows, kv_heads, kv_len, head_dim)."""
        cache_k, cache_v = self.k[layer], self.v[layer]
        if batch.q_len == 1:
            # One token per row: one indexed write for the whole batch.
            cache_k[batch.slot_index, :, batch.start_index] = k[:, :, 0]
            cache_v[batch.slot_index, :, batch.start_index] = v[:, :, 0]
        else:
            # Only each row's real tokens: padding would write past short rows' slots.
            for row, (slot, start, length) in enumerate(zip(batch.slots, batch.starts, batch.lengths)):
                cache_k[slot, :, start : start + length] = k[row, :, :length]
                cache_v[slot, :, start : start + length] = v[row, :, :length]
        if batch.contiguous:
            rows = slice(batch.slots[0], batch.slots[0] + batch.rows)
            return cache_k[rows, :, : batch.kv_len], cache_v[rows, :, : batch.kv_len]
        index = batch.slot_index
        return cache_k[index, :, : batch.kv_len], cache_v[index, :, : batch.kv_len]

    def clear(self, slot: int, end: int, start: int = 0) -> None:
        """Zero positions ``start..end-1`` of ``slot``: a later sequence's masked keys there
        multiply their values by a zero weight, and 0 * NaN would be NaN."""
        self.k[:, slot, :, start:end] = 0
        self.v[:, slot, :, start:end] = 0

    def move(self, source: int, target: int, length: int) -> None:
        """Move the first ``length`` positions of slot ``source`` into (all-zero) ``target``,
        zeroing them in ``source``."""
        self.k[:, target, :, :length] = self.k[:, source, :, :length]
        self.v[:, target, :, :length] = self.v[:, source, :, :length]
        self.clear(source, length)

    def swap(self, a: int, len_a: int, b: int, len_b: int) -> None:
        """Exchange the contents of slots ``a`` and ``b`` (their first ``len_*`` positions)."""
        saved_k = self.k[:, a, :, :len_a].clone()
        saved_v = self.v[:, a, :, :len_a].clone()
        self.clear(a, len_a, start=len_b)  # the tail b's positions will not overwrite
        self.move(b, a, len_b)
        self.k[:, b, :, :len_a] = saved_k
        self.v[:, b, :, :len_a] = saved_v
