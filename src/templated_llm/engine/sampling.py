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
                generators: Rows[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` (rows, vocab; float32), for row ``r``'s ``params[r]``,
    the token ids it has seen so far (prompt and generated) and its generator."""
    tokens = logits.argmax(dim=-1)
    for row, p in enumerate(params):
        if p.greedy and p.repetition_penalty == 1.0:
            continue
        scores = logits[row]
        if p.repetition_penalty != 1.0:
            scores = _penalised(scores, seen[row], p.repetition_penalty)
        tokens[row] = scores.argmax() if p.greedy else _sample(scores, p, generators[row])
    return tokens.tolist()


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
    scores = scores / p.temperature
    if p.top_k and p.top_k < scores.shape[-1]:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        probs = ordered.softmax(dim=-1)
        # Drop a token once the likelier ones already reach top_p (the likeliest always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= p.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=gen)[0]
