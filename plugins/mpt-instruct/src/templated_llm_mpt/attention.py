"""Installs a fast attention backend into transformers' MPT model, keeping its weights and config.

transformers' ``MptForCausalLM`` implements only eager attention. ``install_attention`` swaps
each block's ``MptAttention`` for :class:`MptFastAttention`, which shares the same ``Wqkv`` and
``out_proj`` modules (no weight is copied) and runs one of the kernels in ``kernels.py``. It
also makes the model build ALiBi once, and makes ``generate`` use a preallocated KV cache.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from templated_llm import AttentionUnavailableError
from templated_llm_mpt.alibi import Alibi
from templated_llm_mpt.kernels import KERNELS, Kernel

_logger = logging.getLogger(__name__)

FAST_BACKENDS = tuple(KERNELS)


class MptFastAttention(nn.Module):
    """``MptAttention``'s computation (clip_qkv, softmax_scale, ALiBi, KV cache) on a fast kernel."""

    def __init__(self, original: nn.Module, kernel: Kernel, alibi: Alibi, last: bool) -> None:
        super().__init__()
        self.Wqkv = original.Wqkv
        self.out_proj = original.out_proj
        self.n_heads = original.n_heads
        self.head_dim = original.head_dim
        self.softmax_scale = original.softmax_scale
        self.clip_qkv = original.clip_qkv
        self.layer_idx = original.layer_idx
        self.kernel = kernel
        self.alibi = alibi
        self.last = last  # the last block frees the per-forward mask

    def forward(self, hidden_states, position_bias, past_key_values=None, attention_mask=None, **kwargs):
        batch, length = hidden_states.shape[:2]
        qkv = self.Wqkv(hidden_states)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        # (batch, length, [q|k|v], heads, head_dim), as MptAttention chunks and reshapes it.
        q, k, v = qkv.view(batch, length, 3, self.n_heads, self.head_dim).transpose(1, 3).unbind(2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        out = self.kernel(q, k, v, attention_mask, self.alibi, self.softmax_scale)
        if self.last:
            self.alibi.release()
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.out_proj(out), None  # no attention weights: fused kernels never form them


def check_model_supported(model: nn.Module, backend: str) -> None:
    """Raise :class:`AttentionUnavailableError` when ``backend`` cannot run on this model."""
    attn_config = model.config.attn_config
    if attn_config.qk_ln:
        # transformers' MptAttention has no q/k LayerNorm: such checkpoints lose those weights.
        raise AttentionUnavailableError(
            f"this MPT checkpoint sets attn_config.qk_ln=True, which transformers' MptForCausalLM "
            f"does not implement; attention backend {backend!r} refuses to run it with different "
            "results from the checkpoint's. Use attention='eager' to run transformers' version."
        )
    if backend == "flash" and model.dtype not in (torch.float16, torch.bfloat16):
        raise AttentionUnavailableError(
            f"attention backend 'flash' needs float16 or bfloat16 weights; the model is "
            f"{model.dtype}. Log with dtype='bfloat16' (the GPU default) or use attention='sdpa'."
        )


def install_attention(model: nn.Module, backend: str) -> str:
    """Run ``backend`` (``sdpa``, ``triton`` or ``flash``) in every MPT block; return it."""
    if backend not in KERNELS:
        raise AttentionUnavailableError(
            f"unknown MPT attention backend {backend!r}; available: {list(FAST_BACKENDS)}"
        )
    check_model_supported(model, backend)
    alibi = Alibi.for_model(model)
    # MptModel.forward rebuilds the full-context ALiBi on every call; our blocks ignore it, and
    # returning the precomputed tensor saves that per-step work.
    model.transformer.build_mpt_alibi_tensor = lambda *args, **kwargs: alibi.bias
    blocks = model.transformer.blocks
    for block in blocks:
        block.attn = MptFastAttention(block.attn, KERNELS[backend], alibi, last=block is blocks[-1])
    # A cache preallocated for prompt + max_new_tokens, written in place, instead of
    # DynamicCache's torch.cat of the whole cache at every decode step. (MPT checkpoints ship
    # use_cache=false, which would void it; templated-llm always generates with the cache.)
    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    # With a static cache on CUDA, generate would torch.compile the forward (cudagraphs): the
    # data-dependent key ranges above (a new int every decode step) would recompile per step.
    model.generation_config.disable_compile = True
    _logger.info("installed %s attention into %d MPT blocks", backend, len(model.transformer.blocks))
    return backend
