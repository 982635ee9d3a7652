"""How the engine runs a model: one forward pass over a :class:`StepBatch` with the slot cache.

A plugin makes its models run on the engine by returning a :class:`ModelAdapter` from its
``engine_adapter`` hook (the MPT plugin's runs MPT through its own attention kernels). The core's
:class:`HuggingFaceAdapter` runs the common decoder families through their own transformers
forward, handing them the slot cache as a Cache-like object, explicit positions and a 4D mask
(transformers passes a 4D mask to the attention as is). With SDPA, a decode step whose rows differ
in length runs each row over its own keys (:mod:`templated_llm.engine.attention`), through an
attention function registered with transformers.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from templated_llm.engine.attention import per_row, per_row_keys
from templated_llm.engine.cache import SlotCache, StepBatch

_logger = logging.getLogger(__name__)

# Families whose transformers forward the HuggingFaceAdapter is tested with (tiny models) and
# whose logits are the plain output projection of the last hidden state (no soft-capping or
# scaling after it, which the adapter would skip).
HF_MODEL_TYPES = frozenset({"llama", "mistral", "ministral", "gpt_neox", "qwen2", "qwen3"})
HF_ATTENTION = frozenset({"eager", "sdpa"})
# The name a model on the engine runs SDPA under (its config's ``_attn_implementation``):
# transformers' SDPA attention, except on the decode steps the engine runs per row.
ENGINE_SDPA = "templated_llm_engine_sdpa"


class ModelAdapter(ABC):
    """One model family's forward pass on the engine's slot cache."""

    def __init__(self, model: Any, layers: int, kv_heads: int, head_dim: int) -> None:
        self.model = model
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype = model.dtype
        self.device = model.device
        # One token's key and value in one layer: what a decode step reads per key.
        self.key_bytes = SlotCache.bytes_per_token(1, kv_heads, head_dim, self.dtype)

    @abstractmethod
    def forward(self, batch: StepBatch, cache: SlotCache) -> torch.Tensor:
        """The logits (rows, vocab) at each row's last fed token, writing the step's keys and
        values into ``cache``; only those positions go through the output layer."""

    def last_hidden(self, hidden: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """Each row's hidden state at its last fed token, through the output layer, as float32."""
        last = hidden[torch.arange(batch.rows, device=hidden.device), batch.last]
        return self.model.get_output_embeddings()(last).float()


class _SlotView:
    """The slot cache as transformers' attention layers call it (``update`` per layer)."""

    def __init__(self, cache: SlotCache, batch: StepBatch) -> None:
        self.cache, self.batch = cache, batch

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        return self.cache.update(layer_idx, self.batch, key, value)


class HuggingFaceAdapter(ModelAdapter):
    """A transformers decoder (Llama, Mistral, GPT-NeoX, ...) through its own forward."""

    def __init__(self, model: Any) -> None:
        config = model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        super().__init__(model, config.num_hidden_layers, kv_heads, head_dim)
        # The attention mask, and its sliding window, per layer type. Qwen2/3 name each layer's
        # type and window only their "sliding_attention" layers (and take a mask per type);
        # Mistral windows every layer; the others have no window.
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        self._type_windows = ({kind: window if kind == "sliding_attention" else None for kind in layer_types}
                              if layer_types else None)
        self._windows = set(self._type_windows.values()) if layer_types else {window}  # the distinct ones
        self.base = model.base_model
        # ENGINE_SDPA: the model was on an engine before (a notebook's second Engine on it).
        self.per_row = config._attn_implementation in ("sdpa", ENGINE_SDPA)
        if self.per_row:
            # The engine owns the model from here on; without the engine's per-row keys the
            # function is transformers' own SDPA attention.
            config._attn_implementation = ENGINE_SDPA

    @classmethod
    def supports(cls, model: Any, attention: str) -> bool:
        if model.config.model_type not in HF_MODEL_TYPES or attention not in HF_ATTENTION:
            return False
        if picks_rope_per_pass(model.config):
            # LongRoPE picks its short or long factors for a whole forward pass from the largest
            # position in it: beside a long sequence, a short one would get the long factors.
            _logger.info("the engine does not run LongRoPE models (rotary factors chosen per "
                         "pass, not per sequence): %s generates whole batches", model.config.model_type)
            return False
        return True

    def forward(self, batch: StepBatch, cache: SlotCache) -> torch.Tensor:
        masks = {window: self._mask(batch, window) for window in self._windows}
        mask = ({kind: masks[window] for kind, window in self._type_windows.items()} if self._type_windows
                else next(iter(masks.values())))
        extra = {}
        if self.per_row:
            # Keyed by window: transformers hands each attention call its layer's sliding_window,
            # and extra keyword arguments of the forward to every attention call.
            keys = {window: per_row_keys(batch, window, key_bytes=self.key_bytes) for window in self._windows}
            if any(k is not None for k in keys.values()):
                extra["engine_row_keys"] = keys
            # A prefill pass whose rows all start at position 0 needs no more than SDPA's own
            # causal mask (right padding comes after every real token; no window cuts in).
            # Given no mask, SDPA skips the keys above the diagonal instead of reading a float
            # mask over them.
            if batch.q_len > 1 and not any(batch.starts) and all(w is None or w >= batch.q_len for w in self._windows):
                extra["engine_causal"] = True
        out = self.base(input_ids=batch.tokens, attention_mask=mask, position_ids=batch.positions,
                        past_key_values=_SlotView(cache, batch), use_cache=True, **extra)
        return self.last_hidden(out.last_hidden_state, batch)

    def _mask(self, batch: StepBatch, window: int | None) -> torch.Tensor:
        # Additive float mask: eager adds it to the scores, SDPA takes it as attn_mask.
        visible = batch.visible(window)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=visible.device)
        return mask.masked_fill_(~visible, torch.finfo(self.dtype).min)


def picks_rope_per_pass(config: Any) -> bool:
    """Whether the model's rotary embedding (LongRoPE) picks its factors for a whole forward
    pass from the largest position in it: a short sequence beside a long one is then rotated
    as a long one, and generates what it does not generate alone."""
    return "longrope" in _rope_types(config)


def _rope_types(config: Any) -> set[str]:
    """The rotary embedding types a config names (one per layer type in some configs)."""
    found: set[str] = set()
    pending = [getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            kind = value.get("rope_type", value.get("type"))
            if isinstance(kind, str):
                found.add(kind)
            pending.extend(v for v in value.values() if isinstance(v, dict))
    return found


def _engine_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None,
                 engine_row_keys: dict[int | None, list[slice] | None] | None = None,
                 engine_causal: bool = False, **kwargs: Any) -> tuple[torch.Tensor, None]:
    keys = engine_row_keys.get(kwargs.get("sliding_window")) if engine_row_keys else None
    if keys is None:
        mask = None if engine_causal else attention_mask  # without a mask it runs causal
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    out = per_row(query, key, value, keys, kwargs.get("scaling"))
    return out.transpose(1, 2), None  # (rows, q, heads, head_dim), as transformers' functions


AttentionInterface.register(ENGINE_SDPA, _engine_sdpa)
# Its masks are SDPA's: transformers builds none for an attention it has no mask function for,
# and generate on a model the engine has run would then ignore padding and sliding windows.
AttentionMaskInterface.register(ENGINE_SDPA, sdpa_mask)
