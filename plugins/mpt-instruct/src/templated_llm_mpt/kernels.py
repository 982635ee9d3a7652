"""Attention kernels with ALiBi for MPT: torch SDPA, flex_attention ("triton") and flash-attn.

Every kernel takes queries (batch, heads, q_len, head_dim), the keys and values of the whole
cache (batch, heads, kv_len, head_dim), transformers' boolean mask (batch, 1, q_len, kv_len;
True = masked: causal, left padding and unfilled static-cache slots) and the model's ALiBi,
and returns the attention output shaped like the queries.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from templated_llm_mpt.alibi import Alibi

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Alibi, float], torch.Tensor]


# Queries per SDPA call in a long prefill (see sdpa).
PREFILL_CHUNK = 256


def sdpa(q, k, v, masked, alibi: Alibi, scale: float) -> torch.Tensor:
    # ALiBi and the mask travel as one additive float mask; SDPA fuses the rest. A float mask
    # stops SDPA from skipping keys no query can see, so each run of queries reads the keys (and
    # builds its mask) only up to the last one it can see: a decode step skips the static cache's
    # unfilled slots (half of them on average), and a long prefill most of the causal mask's
    # upper triangle (a 1024-token prompt: -35%).
    outputs = [
        F.scaled_dot_product_attention(
            q[..., start:end, :], k[..., :keys, :], v[..., :keys, :], attn_mask=mask, scale=scale
        )
        for start, end, keys, mask in alibi.chunk_masks(masked, q.dtype, PREFILL_CHUNK)
    ]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)


@functools.cache
def _compiled_flex_attention(device_type: str) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        # Automatic dynamic shapes: the second shape seen compiles a kernel for every shape.
        # Static ones recompile per batch size and cache length, and after dynamo's limit of
        # 8 flex_attention falls back to an unfused kernel 10x slower than eager (measured on
        # an H100).
        return torch.compile(flex_attention, dynamic=None)
    # Static shapes: dynamic ones fail to lower on CPU in this torch. Every new shape compiles
    # once (tens of seconds on CPU) and is cached.
    return torch.compile(flex_attention, dynamic=False)


def flex(q, k, v, masked, alibi: Alibi, scale: float) -> torch.Tensor:
    bias = alibi.for_keys(k.shape[-2], torch.float32)[:, 0]  # (heads, kv_len)
    masked = masked[:, 0]
    lowest = torch.finfo(torch.float32).min

    def alibi_score(score, b, h, q_idx, kv_idx):
        return torch.where(masked[b, q_idx, kv_idx], lowest, score + bias[h, kv_idx])

    # Contiguous inputs: the queries (and keys outside a cache) are strided views of the fused
    # qkv projection, and a new stride is a new compile, like a new shape.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _compiled_flex_attention(q.device.type)(q, k, v, score_mod=alibi_score, scale=scale)


def flash(q, k, v, masked, alibi: Alibi, scale: float) -> torch.Tensor:
    """flash-attn 2 on the cache in place; needs CUDA, float16/bfloat16 and flash-attn >= 2.6.

    The last query's mask row says which cache slots hold tokens: left padding before them,
    unfilled static-cache slots after. flash-attn takes that as ``cache_leftpad`` and
    ``cache_seqlens`` and applies causality and ALiBi (relative to each query) itself.
    """
    from flash_attn import flash_attn_with_kvcache

    valid = ~masked[:, 0, -1, :]  # (batch, kv_len)
    kv_len = valid.shape[-1]
    left_pad = valid.int().argmax(dim=-1).to(torch.int32)
    seq_lens = (kv_len - valid.flip(-1).int().argmax(dim=-1)).to(torch.int32)
    out = flash_attn_with_kvcache(
        q.transpose(1, 2),  # flash-attn's layout is (batch, seq, heads, head_dim)
        k.transpose(1, 2),
        v.transpose(1, 2),
        cache_seqlens=seq_lens,
        cache_leftpad=left_pad,
        softmax_scale=scale,
        causal=True,
        alibi_slopes=alibi.slopes,
    )
    return out.transpose(1, 2)


KERNELS: dict[str, Kernel] = {"sdpa": sdpa, "triton": flex, "flash": flash}
