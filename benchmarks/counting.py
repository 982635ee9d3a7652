"""Counts the new tokens each contender's model really generates, so that tokens/s never credits a
contender with tokens it did not make (a row ending at the end-of-text token, say).

A spy wraps the transformers model's own ``generate`` (every contender, MLflow's included, calls
it in this process): for every row it counts the new tokens that are neither the end-of-text
token nor padding. A contender's call must have made exactly the tokens asked of every row, or
the benchmark stops with :class:`TokenShortfall`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class TokenShortfall(RuntimeError):
    """A contender generated another number of new tokens than it was asked for."""


class _Spy:
    def __init__(self, model: Any) -> None:
        self.rows: list[int] = []
        self._model = model
        self._generate = model.generate

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = self._generate(*args, **kwargs)
        prompt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        config = kwargs.get("generation_config") or self._model.generation_config
        ended = {kwargs.get("pad_token_id", config.pad_token_id), *_ids(config.eos_token_id)}
        new = getattr(output, "sequences", output)[:, prompt.shape[-1]:]
        for row in new.tolist():
            self.rows.append(sum(token not in ended for token in row))
        return output


def _ids(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _spy(model: Any) -> _Spy:
    # One spy per model, however many contenders run it (predict and its own generate share one).
    if not isinstance(model.generate, _Spy):
        model.generate = _Spy(model)
    return model.generate


@contextlib.contextmanager
def exact_tokens(model: Any, label: str, rows: int, max_tokens: int) -> Iterator[None]:
    """Check that the calls of ``model.generate`` made within generated ``max_tokens`` new
    tokens for each of ``rows`` prompts; raise :class:`TokenShortfall` otherwise."""
    spy = _spy(model)
    spy.rows.clear()
    yield
    counted = list(spy.rows)
    spy.rows.clear()
    if len(counted) != rows or any(n != max_tokens for n in counted):
        raise TokenShortfall(
            f"{label} generated {counted} new tokens per prompt where {max_tokens} were asked for "
            f"each of {rows} prompts: its tokens/s would count tokens it did not generate"
        )
