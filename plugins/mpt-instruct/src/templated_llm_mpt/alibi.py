"""MPT's ALiBi bias, computed once per loaded model and sliced per forward pass."""

from __future__ import annotations

import torch


class Alibi:
    """ALiBi for one model: per-head slopes and the bias for the whole context.

    ``bias[h, 0, j]`` is ``slopes[h] * (j - (max_len - 1))``, as transformers builds it. Only a
    key's distance from its query matters (softmax ignores a constant added to a whole row), but
    the constant does matter once the bias is rounded: in bfloat16 (8 bits of mantissa) a bias
    of -374 cannot tell neighbouring keys apart. So the masks here measure every key from its
    own query (``slopes[h] * (key - query)``): a query's nearest keys get the smallest, exactly
    representable values, whatever the longest row of the batch or the end of the cache.
    """

    def __init__(self, slopes: torch.Tensor, bias: torch.Tensor) -> None:
        self.slopes = slopes  # (n_heads,), float32
        self.bias = bias  # (n_heads, 1, max_len), float32
        self._by_dtype: dict[torch.dtype, torch.Tensor] = {}
        # What the forward pass under way built from its mask (each query's position, the query
        # chunks and their additive masks): the first block builds it and the others reuse it.
        self._pass: tuple[torch.Tensor, dict] | None = None

    @classmethod
    def for_model(cls, model) -> Alibi:
        """Build from the model's own ALiBi function, so the values are the ones eager uses."""
        transformer = model.transformer
        bias = transformer.build_mpt_alibi_tensor(
            transformer.num_heads, model.config.max_seq_len, device=model.device
        ).float()
        return cls(slopes=bias[:, 0, -1] - bias[:, 0, -2], bias=bias)

    def for_keys(self, n_keys: int, dtype: torch.dtype) -> torch.Tensor:
        """The bias of ``n_keys`` keys for a query at the last of them, shape (n_heads, 1, n_keys)."""
        if dtype not in self._by_dtype:
            self._by_dtype[dtype] = self.bias.to(dtype)
        return self._by_dtype[dtype][:, :, self.bias.shape[-1] - n_keys :]

    def for_queries(self, masked: torch.Tensor, start: int, end: int, keys: int) -> torch.Tensor:
        """The float32 bias of keys ``0..keys-1`` for queries ``start..end-1``, each measured from
        its own query, shape (batch, n_heads, end - start, keys). A query's position is the last
        key it sees (``masked``: True = masked, shape (batch, 1, q, kv))."""
        state = self._state(masked)
        if "positions" not in state:
            # The last key each query sees (its own), from the end of its mask row; any key for
            # a padding query, which sees none.
            seen = (~masked).flip(-1).to(torch.uint8)
            state["positions"] = masked.shape[-1] - 1 - seen.argmax(dim=-1, keepdim=True)
        distance = torch.arange(keys, device=masked.device) - state["positions"][..., start:end, :]
        return distance * self.slopes.view(1, -1, 1, 1)

    def for_pass(self, masked: torch.Tensor) -> torch.Tensor:
        """:meth:`for_queries` of every query and key, built once per forward pass."""
        state = self._state(masked)
        if "whole" not in state:
            state["whole"] = self.for_queries(masked, 0, masked.shape[-2], masked.shape[-1])
        return state["whole"]

    def chunk_masks(
        self, masked: torch.Tensor, dtype: torch.dtype, size: int
    ) -> list[tuple[int, int, int, torch.Tensor]]:
        """``(start, end, keys, mask)`` for every run of ``size`` queries: no query of the run sees
        a key at or after ``keys`` (under a causal mask early queries see few), and ``mask`` is
        ALiBi plus ``masked`` (True = masked, shape (batch, 1, q, k)) as one float mask over those
        queries and keys only: what no query sees is never built.

        Masked positions get the dtype's minimum, not -inf, like eager: a row with every key
        masked (a padding query) then averages instead of turning into NaN, which would reach
        real tokens through the values. Built once per forward pass; see :meth:`release`.
        """
        state = self._state(masked)
        if "chunks" not in state:
            lowest = torch.finfo(dtype).min
            visible = (~masked[:, 0]).any(dim=0)  # (q, kv): seen by some row of the batch
            chunks = []
            for start in range(0, visible.shape[0], size):
                end = min(start + size, visible.shape[0])
                seen = visible[start:end].any(dim=0).nonzero()
                # A run of padding queries sees nothing; one key keeps its output finite.
                keys = int(seen[-1]) + 1 if len(seen) else 1
                bias = self.for_queries(masked, start, end, keys).to(dtype)
                chunks.append((start, end, keys, bias.masked_fill_(masked[..., start:end, :keys], lowest)))
            state["chunks"] = chunks
        return state["chunks"]

    def _state(self, masked: torch.Tensor) -> dict:
        # Every block gets the same boolean mask object from transformers within one pass.
        if self._pass is None or self._pass[0] is not masked:
            self._pass = (masked, {})
        return self._pass[1]

    def release(self) -> None:
        """Drop what the forward pass built (the last block calls this)."""
        self._pass = None
