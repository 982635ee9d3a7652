"""The next token of every row of a step, each with its own sequence's settings.

Greedy rows without a repetition penalty (the common case) take one vectorised argmax;
penalised and sampled rows are handled per row. A seeded sequence draws from its own
``torch.Generator``, so its draws depend on nothing that runs beside it.
"""

from __future__ import annotations

from collections.abc import Sequence as Rows

import torch

from templated_llm.runtime.params import GenerationParams


def generator(params: GenerationParams, device: torch.device) -> torch.Generator | None:
    """The sequence's own generator when it is seeded and samples; ``None`` draws from torch's."""
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def next_tokens(logits: torch.Tensor, params: Rows[GenerationParams], seen: Rows[list[int]],
                generators: Rows[torch.Generator | None]) -> tuple[list[int], dict[int, Exception]]:
    """One token per row of ``logits`` (rows, vocab; float32), for row ``r``'s ``params[r]``,
    the token ids it has seen so far (prompt and generated) and its generator; and the rows
    whose sampling raised, with the error: those rows' tokens are meaningless, and the other
    rows' draws are what they would have been without them."""
    tokens = logits.argmax(dim=-1)
    failed: dict[int, Exception] = {}
    for row, p in enumerate(params):
        if p.greedy and p.repetition_penalty == 1.0:
            continue
        try:
            scores = logits[row]
            if p.repetition_penalty != 1.0:
                scores = _penalised(scores, seen[row], p.repetition_penalty)
            tokens[row] = scores.argmax() if p.greedy else _sample(scores, p, generators[row])
        except Exception as exc:  # noqa: BLE001 - one row's settings must not fail its neighbours
            failed[row] = exc
    return tokens.tolist(), failed


def _penalised(scores: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    # transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit is divided by the
    # penalty when positive and multiplied when negative.
    ids = torch.tensor(seen, device=scores.device)
    picked = scores[ids]
    scores = scores.clone()
    scores[ids] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores


def _sample(scores: torch.Tensor, p: GenerationParams, gen: torch.Generator | None) -> torch.Tensor:
    # transformers' order: temperature, then top-k, then top-p.
    # A small repetition penalty or temperature can push logits past float32's range: as its
    # largest finite value such a token stays the likeliest, and the softmax below stays defined.
    scores = (scores / p.temperature).nan_to_num(nan=float("-inf"), posinf=torch.finfo(scores.dtype).max,
                                                 neginf=float("-inf"))
    if p.top_k and p.top_k < scores.shape[-1]:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        probs = ordered.softmax(dim=-1)
        # Drop a token once the likelier ones already reach top_p (the likeliest always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= p.top_p
        drop[0] = False  # a top_p below float32's smallest number compares as 0
        scores = scores.scatter(0, order[drop], float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=gen)[0]
