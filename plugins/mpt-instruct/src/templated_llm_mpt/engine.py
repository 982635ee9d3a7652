"""MPT on templated-llm's continuous-batching engine: its own forward pass on the slot cache.

Embedding, then each block (norm, Wqkv, attention on the slot cache with one of this plugin's
kernels, out_proj, norm, MLP with its GELU fused into the packed up_proj), then the final norm,
and the output layer only at the positions that need logits. ALiBi needs only each key's
distance from its query, read from the mask, so rows at different lengths share a pass with no
position ids at all. With SDPA, a decode step whose rows differ in length runs each
row over its own keys (``templated_llm.engine.attention``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from templated_llm.engine import ModelAdapter, SlotCache, StepBatch
from templated_llm.engine.attention import per_row, per_row_keys
from templated_llm.runtime.packed_linear import linear_gelu
from templated_llm_mpt.alibi import Alibi
from templated_llm_mpt.kernels import flex, sdpa

_logger = logging.getLogger(__name__)


def eager(q, k, v, masked, alibi: Alibi, scale: float) -> torch.Tensor:
    """The reference: transformers' eager MPT attention (matmul, ALiBi, mask, softmax, matmul),
    with its float32 ALiBi measured from each query (see Alibi)."""
    scores = q @ k.transpose(-1, -2) * scale + alibi.for_pass(masked)
    scores = scores.masked_fill(masked, torch.finfo(q.dtype).min)
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


class MptAdapter(ModelAdapter):
    def __init__(self, model: Any, attention: str) -> None:
        config = model.config
        super().__init__(model, config.n_layers, config.n_heads, config.d_model // config.n_heads)
        blocks = model.transformer.blocks
        installed = getattr(blocks[0].attn, "alibi", None)
        self.alibi = installed if installed is not None else Alibi.for_model(model)
        if attention == "flash":
            # flash-attn's kv-cache kernel takes one query run per row ending at the cache's
            # end; the engine's right-padded prefill rows do not fit it.
            _logger.info("the engine runs MPT's flash attention as sdpa")
        self.kernel = {"eager": eager, "triton": self._flex}.get(attention, sdpa)
        self._cache_shape: tuple[int, int] | None = None
        # MPT's MLP with its exact GELU runs with the GELU fused (see _mlp); another one as is.
        self._fused_mlp = all(isinstance(getattr(block.ffn, "act", None), nn.GELU)
                              and block.ffn.act.approximate == "none" for block in blocks)

    def forward(self, batch: StepBatch, cache: SlotCache) -> torch.Tensor:
        transformer = self.model.transformer
        self._cache_shape = (cache.slots, cache.slot_len)
        masked = ~batch.visible()
        keys = per_row_keys(batch, key_bytes=self.key_bytes) if self.kernel is sdpa else None
        hidden = transformer.wte(batch.tokens)
        try:
            for layer, block in enumerate(transformer.blocks):
                hidden = hidden + self._attention(block.attn, block.norm_1(hidden), layer, batch,
                                                  cache, masked, keys)
                hidden = self._mlp(block.ffn, block.norm_2(hidden), hidden)
        finally:
            self.alibi.release()  # the per-pass masks and biases the kernels built
        return self.last_hidden(transformer.norm_f(hidden), batch)

    def _attention(self, attn: Any, x: torch.Tensor, layer: int, batch: StepBatch, cache: SlotCache,
                   masked: torch.Tensor, keys: list[slice] | None) -> torch.Tensor:
        rows, length = x.shape[:2]
        qkv = attn.Wqkv(x)
        if attn.clip_qkv:
            qkv = qkv.clamp(min=-attn.clip_qkv, max=attn.clip_qkv)
        q, k, v = qkv.view(rows, length, 3, attn.n_heads, attn.head_dim).transpose(1, 3).unbind(2)
        k, v = cache.update(layer, batch, k, v)
        if keys is not None:
            # Each row's keys measured from its own query, the last of them.
            out = per_row(q, k, v, keys, attn.softmax_scale, bias=self.alibi.for_keys(k.shape[-2], q.dtype))
        else:
            out = self.kernel(q, k, v, masked, self.alibi, attn.softmax_scale)
        return attn.out_proj(out.transpose(1, 2).reshape(rows, length, -1))

    def _mlp(self, ffn: Any, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # MptMLP's forward with the GELU fused into up_proj (its dropout is off in inference).
        if not self._fused_mlp:
            return ffn(x, residual)
        return ffn.down_proj(linear_gelu(ffn.up_proj, x)) + residual

    def _flex(self, q, k, v, masked, alibi: Alibi, scale: float) -> torch.Tensor:
        # flex_attention compiles once per shape: every call is padded to all slots, the whole
        # slot length and a power-of-two query length, so a handful of shapes cover any traffic.
        slots, slot_len = self._cache_shape
        rows, heads, length, dim = q.shape
        padded = 1 << (length - 1).bit_length()

        def pad(t: torch.Tensor, size: int) -> torch.Tensor:
            out = t.new_zeros(slots, heads, size, dim)
            out[:rows, :, : t.shape[2]] = t
            return out

        mask = masked.new_ones(slots, 1, padded, slot_len)
        mask[:rows, :, :length, : masked.shape[-1]] = masked
        out = flex(pad(q, padded), pad(k, slot_len), pad(v, slot_len), mask, alibi, scale)
        return out[:rows, :, :length]
