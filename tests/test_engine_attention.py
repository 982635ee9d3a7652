"""Per-row decode attention: each row over its own keys equals one padded, masked call."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from templated_llm.engine.attention import per_row, per_row_keys, row_keys
from templated_llm.engine.cache import StepBatch


def _decode_batch(key_lengths: list[int], device: str = "cpu") -> StepBatch:
    rows = len(key_lengths)
    return StepBatch(torch.zeros(rows, 1, dtype=torch.long, device=device), list(range(rows)),
                     [n - 1 for n in key_lengths], [1] * rows)


@settings(max_examples=60, deadline=None)
@given(
    key_lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    heads=st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 3)]),  # query heads, key heads
    window=st.one_of(st.none(), st.integers(1, 12)),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_per_row_equals_one_padded_masked_call(key_lengths, heads, window, with_bias, seed):
    generator = torch.Generator().manual_seed(seed)
    rows, (q_heads, kv_heads), dim = len(key_lengths), heads, 8
    batch = _decode_batch(key_lengths)
    q = torch.randn(rows, q_heads, 1, dim, generator=generator)
    # The cache's padded view: keys past a row's length hold another sequence's leftovers.
    k = torch.randn(rows, kv_heads, batch.kv_len, dim, generator=generator)
    v = torch.randn(rows, kv_heads, batch.kv_len, dim, generator=generator)
    bias = torch.randn(q_heads, 1, batch.kv_len, generator=generator) if with_bias else None

    mask = torch.zeros(rows, 1, 1, batch.kv_len).masked_fill(~batch.visible(window), float("-inf"))
    if bias is not None:
        # A row's keys take the bias's last columns: its last key, nearest the query, the last.
        row_bias = torch.zeros(rows, q_heads, 1, batch.kv_len)
        for row, span in enumerate(row_keys(batch, window)):
            row_bias[row, :, :, span] = bias[..., batch.kv_len - (span.stop - span.start):]
        mask = mask + row_bias
    groups = q_heads // kv_heads
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1),
        attn_mask=mask, scale=0.3)

    torch.testing.assert_close(per_row(q, k, v, row_keys(batch, window), 0.3, bias=bias), expected)


# A key and its value in one layer: mpt-7b's in bfloat16 (32 heads of 128), the benchmark's
# d_model 512 model's (8 heads of 64).
BIG_KEY, SMALL_KEY = 2 * 32 * 128 * 2, 2 * 8 * 64 * 2


def test_rows_attend_per_row_where_the_padding_outweighs_a_call_per_row():
    even, uneven = _decode_batch([30, 30, 28]), _decode_batch([100, 10, 20])
    assert per_row_keys(even, key_bytes=BIG_KEY) is None  # 2 keys of padding: one call
    # 170 keys of padding: 2.8 MB of a 7B model's keys, more than 3 calls cost; a small
    # model's 0.35 MB of them cost less than the calls.
    assert per_row_keys(uneven, key_bytes=BIG_KEY) == [slice(0, 100), slice(0, 10), slice(0, 20)]
    assert per_row_keys(uneven, key_bytes=SMALL_KEY) is None
    assert per_row_keys(_decode_batch([800, 10, 20]), key_bytes=SMALL_KEY) == [slice(0, 800), slice(0, 10), slice(0, 20)]
    # A window makes rows even: each attends its last 10 keys, a padded call reads 100 per row.
    assert per_row_keys(uneven, window=10, key_bytes=BIG_KEY) == [slice(90, 100), slice(0, 10), slice(10, 20)]
    # Prefill rows (several queries each) always take one masked call.
    prefill = StepBatch(torch.zeros(2, 5, dtype=torch.long), [0, 1], [95, 0], [5, 5])
    assert per_row_keys(prefill, key_bytes=BIG_KEY) is None
    # Off the CPU (here the meta device stands in for a GPU) steps stay padded.
    assert per_row_keys(_decode_batch([100, 10, 20], device="meta"), key_bytes=BIG_KEY) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_row_keeps_the_dtype_and_shape(dtype):
    q = torch.randn(2, 4, 1, 8, dtype=dtype)
    k = v = torch.randn(2, 2, 16, 8, dtype=dtype)
    out = per_row(q, k, v, [slice(0, 16), slice(0, 3)], None)
    assert out.shape == q.shape and out.dtype == dtype
