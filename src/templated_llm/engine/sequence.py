"""One request's sequence: the state the scheduler advances, and the handle its caller holds."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from templated_llm.errors import SequenceFailedError
from templated_llm.runtime.completions import Completion, cut_at_stop, held_back_at_stop
from templated_llm.runtime.params import GenerationParams
from templated_llm.runtime.structured import GrammarState
from templated_llm.runtime.tokens import IncrementalText

_END = object()


@dataclass(eq=False)
class SequenceState:
    """What the scheduler thread knows of a sequence; the caller's threads read it only after
    ``done`` is set, or through ``deltas``."""

    prompt_ids: list[int]
    params: GenerationParams
    generator: torch.Generator | None
    grammar: GrammarState | None = None  # structured output: the tokens this sequence may take
    submitted: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys and values are in the slot
    slot: int = -1
    streaming: bool = False  # a consumer reads ``deltas``: decode at every step
    first_token_at: float | None = None
    finished_at: float | None = None
    text: str = ""  # decoded generated text, as far as decoded
    emitted: int = 0  # characters of ``text`` already put in ``deltas``
    decoded: IncrementalText = field(default_factory=IncrementalText)
    deltas: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    completion: Completion | None = None
    error: BaseException | None = None

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt_ids)

    @property
    def seen(self) -> list[int]:
        return self.prompt_ids + self.generated

    def decode(self, tokenizer: Any) -> None:
        """Decode the tokens generated since the last call and queue their text for a stream
        (see IncrementalText)."""
        self.text = self.decoded.update(tokenizer, self.generated)
        if len(self.text) > self.emitted:
            self.deltas.put(self.text[self.emitted :])
            self.emitted = len(self.text)

    def stopped_at_string(self) -> bool:
        return any(s in self.text for s in self.params.stop)

    def finish(self, reason: str, tokenizer: Any) -> None:
        self.text = tokenizer.decode(self.generated, skip_special_tokens=True)
        if len(self.text) > self.emitted:
            self.deltas.put(self.text[self.emitted :])
        self.completion = Completion(
            text=cut_at_stop(self.text, self.params.stop), prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.generated), finish_reason=reason,
        )
        self._end()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._end()

    def _end(self) -> None:
        self.finished_at = time.perf_counter()
        self.deltas.put(_END)
        self.done.set()


class Sequence:
    """A caller's handle on a submitted sequence: wait for it, stream it, or cancel it."""

    def __init__(self, state: SequenceState, wake: Any) -> None:
        self._state = state
        self._wake = wake

    @property
    def prompt_ids(self) -> list[int]:
        return self._state.prompt_ids

    @property
    def params(self) -> GenerationParams:
        return self._state.params

    @property
    def done(self) -> bool:
        return self._state.done.is_set()

    @property
    def completion(self) -> Completion | None:
        """The completion with its usage, once the sequence has ended (``None`` before)."""
        return self._state.completion

    @property
    def timings(self) -> tuple[float, float | None, float | None]:
        """``time.perf_counter()`` at submission, at the first token and at the end (``None``
        until then): for latency metrics."""
        return self._state.submitted, self._state.first_token_at, self._state.finished_at

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the sequence to end and return its completion.

        Raises :class:`SequenceFailedError` if a step it was in failed,
        :class:`~templated_llm.errors.EngineClosedError` if the engine closed first, and
        ``TimeoutError`` after ``timeout`` seconds.
        """
        if not self._state.done.wait(timeout):
            raise TimeoutError(f"the sequence did not end within {timeout} s")
        if self._state.error is not None:
            raise self._state.error
        return self._state.completion

    def stream(self) -> Iterator[str]:
        """The generated text in pieces as it is generated, held back where it could be the
        start of a stop string (the pieces join to ``result().text``). Closing the iterator
        before the end cancels the sequence."""
        self._state.streaming = True
        ended = False
        try:
            yield from held_back_at_stop(self._deltas(), self._state.params.stop)
            ended = True  # at a stop string the engine ends the sequence itself, as "stop"
        finally:
            if not ended:
                self.cancel()

    def _deltas(self) -> Iterator[str]:
        while (delta := self._state.deltas.get()) is not _END:
            yield delta
        if self._state.error is not None:
            raise self._state.error

    def cancel(self) -> None:
        """Stop the sequence; its slot is freed at the next step (no effect once it ended)."""
        if not self._state.done.is_set():
            self._state.cancelled.set()
            self._wake()


def step_failure(error: BaseException) -> SequenceFailedError:
    """The error a sequence gets when a step it was in raised ``error``."""
    failure = SequenceFailedError(
        f"generation failed in an engine step this sequence was part of: "
        f"{type(error).__name__}: {error}; retry the request"
    )
    failure.__cause__ = error
    return failure
