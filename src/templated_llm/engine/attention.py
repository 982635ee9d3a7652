"""Decode attention that reads each row's own keys only.

A decode step attends every decoding sequence's one new query to the keys in its slot. One SDPA
call over all rows reads every row up to the longest row's length (the view
``k[layer, :rows, :, :longest]``), masking the rest; under mixed traffic (short and long
prompts, early and late in their generations) that is about 1.7 times the keys the rows need,
and a decode step's attention is bound by reading them. Attending each row in a call of its own
reads only its keys, at the cost of a call per row; :func:`per_row_keys` picks whichever is
faster for the step at hand. Both are the same softmax over the same keys, so they agree to
rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from templated_llm.engine.cache import StepBatch

# A call per row costs about as much as reading this many bytes of padded keys and values.
# With no padding, per-row steps ran 0.81-0.96x as fast as padded ones (python -m
# benchmarks.decode_attention, 25M models, 4-64 rows, 2 cores, both dtypes); short rows (16-128
# keys) padded to the longest read 1.36-1.87x the keys needed and still ran faster padded (per
# row 0.72-0.99x), while rows of 16-700 keys ran 0.98-1.28x as fast per row.
_PER_ROW_CALL_BYTES = 256 * 2**10


def row_keys(batch: StepBatch, window: int | None = None) -> list[slice]:
    """The keys each row's last query attends: all of its row's, or its last ``window``."""
    return [slice(0 if window is None else max(0, n - window), n) for n in batch.key_lengths]


def per_row_keys(batch: StepBatch, window: int | None = None, *, key_bytes: int) -> list[slice] | None:
    """:func:`row_keys` when this step's attention should run a call per row, else ``None``:
    on a CPU decode step (one query per row) where the padding one call would read, at
    ``key_bytes`` per key (a key and its value in one layer), outweighs a call per row.
    """
    # Only where it was measured, the CPU: on a GPU each call is a kernel launch, and padded
    # keys are read fast.
    if batch.q_len != 1 or batch.tokens.device.type != "cpu":
        return None
    keys = row_keys(batch, window)
    padding = batch.rows * batch.kv_len - sum(k.stop - k.start for k in keys)
    return keys if padding * key_bytes >= batch.rows * _PER_ROW_CALL_BYTES else None


def per_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: Sequence[slice], scale: float | None,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per row over that row's ``keys`` only.

    ``q`` is (rows, heads, 1, head_dim); ``k`` and ``v`` (rows, kv_heads, kv_len, head_dim), the
    padded keys a single call would read, with ``kv_heads`` dividing ``heads`` (grouped-query
    attention: each key head serves consecutive query heads, as transformers' ``repeat_kv``).
    ``bias`` (heads, 1, n), ``n`` at least the longest span, is added to every row's scores,
    its last columns to a row's keys: ``bias[..., -1]`` to the key nearest the query, so a
    bias measured from the query (ALiBi) is the same for every row, whatever its length.
    Returns (rows, heads, 1, head_dim).
    """
    rows, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    # A single query needs no causal mask, so a key head's queries can be one call's queries:
    # (1, kv_heads, heads / kv_heads, dim) over that head's keys, with no repeated keys.
    grouped = q.reshape(rows, kv_heads, heads // kv_heads, dim)
    if bias is not None:
        # 4D: SDPA's CPU kernel takes a 3D mask down a path several times as slow.
        bias = bias.view(1, kv_heads, heads // kv_heads, -1)
    outputs = [
        F.scaled_dot_product_attention(
            grouped[row : row + 1], k[row : row + 1, :, span], v[row : row + 1, :, span],
            attn_mask=None if bias is None else bias[..., bias.shape[-1] - (span.stop - span.start):],
            scale=scale,
        )
        for row, span in enumerate(keys)
    ]
    return torch.cat(outputs).view(rows, heads, 1, dim)
