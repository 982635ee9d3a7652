"""Counts the new tokens each contender really generates, so that tokens/s never credits a
contender with tokens it did not make (a row ending at the end-of-text token, say).

Two sources, each contender's own: a spy on the transformers model's ``generate`` (the tutorial
pyfunc, plain transformers, the flavor's pipeline) counts each row's new tokens that are neither
the end-of-text token nor padding; TemplatedLLM, whose ``predict`` runs on its continuous-
batching engine rather than ``generate``, reports each row's ``completion_tokens`` itself
(``return_usage``). A call must have made exactly the tokens asked of every row, or the benchmark
stops with :class:`TokenShortfall`.
"""

from __future__ import annotations

from typing import Any


class TokenShortfall(RuntimeError):
    """A contender generated another number of new tokens than it was asked for."""


def check_tokens(label: str, counted: list[int], rows: int, max_tokens: int) -> None:
    """Raise :class:`TokenShortfall` unless ``counted`` is ``max_tokens`` for each of ``rows``."""
    if len(counted) != rows or any(n != max_tokens for n in counted):
        raise TokenShortfall(
            f"{label} generated {counted} new tokens per prompt where {max_tokens} were asked for "
            f"each of {rows} prompts: its tokens/s would count tokens it did not generate"
        )


class Counted:
    """New tokens per row, recorded as they are generated; :meth:`take` hands them over."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def take(self) -> list[int]:
        rows, self.rows = self.rows, []
        return rows


class _GenerateSpy(Counted):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self._model = model
        self._generate = model.generate

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = self._generate(*args, **kwargs)
        prompt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        config = kwargs.get("generation_config") or self._model.generation_config
        ended = {kwargs.get("pad_token_id", config.pad_token_id), *_ids(config.eos_token_id)}
        new = getattr(output, "sequences", output)[:, prompt.shape[-1]:]
        self.rows.extend(sum(token not in ended for token in row) for row in new.tolist())
        return output


def _ids(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def generate_spy(model: Any) -> Counted:
    """The rows ``model.generate`` makes from now on; one spy per model, however many ask."""
    if not isinstance(model.generate, _GenerateSpy):
        model.generate = _GenerateSpy(model)
    return model.generate
