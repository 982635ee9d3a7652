"""Merges concurrent ``predict`` calls that share their params into one ``generate`` batch.

``mlflow models serve`` runs each request's ``predict`` on a thread of its own, and generation on
one shared model runs one batch at a time. Requests that arrive while a batch generates wait; the
next one to run takes every waiting request with the same params along, so eight concurrent
one-prompt requests cost about one eight-prompt ``generate`` instead of eight in a row.

Merging does not change what a request gets: prompts are padded on the left and masked, so
greedy decoding gives each prompt the completion it gets alone (as rows of one request already
are, up to the floating-point rounding a different batch shape may bring), and a seeded request,
whose random draws depend on its batch, always runs alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from templated_llm.runtime.params import GenerationParams

# Most prompts one merged batch takes (one request alone may have more).
MAX_MERGED_PROMPTS = 64
# Most padded tokens, rows x (longest prompt + max_tokens), one merged batch takes (one request
# alone may have more): what the KV cache and activations grow with. A long prompt pads every
# row merged with it, so a bound on rows alone lets one long prompt blow up a batch of short ones.
MAX_MERGED_TOKENS = 32768

# Token ids of every prompt in a batch -> one result per prompt, in order.
Generate = Callable[[list[list[int]], GenerationParams], Sequence[Any]]


@dataclass(eq=False)
class _Request:
    input_ids: list[list[int]]
    params: GenerationParams
    results: Sequence[Any] | None = None
    error: BaseException | None = None

    def done(self) -> bool:
        return self.results is not None or self.error is not None

    def joins(self, leader: _Request) -> bool:
        return self.params == leader.params and self.params.seed is None


class ModelLock:
    """The model, used by one batch or stream at a time: a ``threading.Lock`` whose waiters can
    also stop waiting once something else happened (their results came in another's batch)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._held = False

    def acquire(self, blocking: bool = True, timeout: float = -1,
                unless: Callable[[], bool] = lambda: False) -> bool:
        """Take the model (``True``), or give up (``False``) on time out or once ``unless()``."""
        with self._changed:
            self._changed.wait_for(lambda: unless() or not self._held,
                                   timeout=(None if timeout < 0 else timeout) if blocking else 0)
            if self._held or unless():
                return False
            self._held = True
            return True

    def release(self) -> None:
        with self._changed:
            self._held = False
            self._changed.notify_all()

    def __enter__(self) -> ModelLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class MicroBatcher:
    """Runs ``generate`` for one batch at a time, merging the requests waiting for it."""

    def __init__(self, generate: Generate, max_prompts: int = MAX_MERGED_PROMPTS,
                 max_padded_tokens: int = MAX_MERGED_TOKENS) -> None:
        self._generate = generate
        self._max_prompts = max_prompts
        self._max_padded_tokens = max_padded_tokens
        self._waiting: list[_Request] = []
        self._waiting_lock = threading.Lock()
        self._model = ModelLock()

    @property
    def lock(self) -> ModelLock:
        """Held while a batch generates: hold it to use the model alone (streaming does)."""
        return self._model

    def submit(self, input_ids: list[list[int]], params: GenerationParams) -> Sequence[Any]:
        """The results for ``input_ids`` (token ids, unpadded), generated with ``params``."""
        request = _Request(input_ids, params)
        with self._waiting_lock:
            self._waiting.append(request)
        # Either this request leads the next batch, or another's batch takes it along: then it
        # returns as soon as that batch ends, whoever uses the model next.
        if self._model.acquire(unless=request.done):
            try:
                self._run(self._take(request))
            finally:
                self._model.release()
        if request.error is not None:
            raise request.error
        return request.results

    def _take(self, leader: _Request) -> list[_Request]:
        with self._waiting_lock:
            batch = [leader]
            if leader.params.seed is None:
                for other in self._waiting:
                    if other is not leader and other.joins(leader) and self._fits([*batch, other]):
                        batch.append(other)
            self._waiting = [r for r in self._waiting if r not in batch]
        return batch

    def _fits(self, batch: list[_Request]) -> bool:
        rows = [ids for request in batch for ids in request.input_ids]
        padded = len(rows) * (max(map(len, rows)) + batch[0].params.max_tokens)
        return len(rows) <= self._max_prompts and padded <= self._max_padded_tokens

    def _run(self, batch: list[_Request]) -> None:
        try:
            results = self._generate([ids for r in batch for ids in r.input_ids], batch[0].params)
        except Exception as exc:  # noqa: BLE001 - raised again in every request's own thread
            for request in batch:
                request.error = exc
            return
        start = 0
        for request in batch:
            request.results = results[start : start + len(request.input_ids)]
            start += len(request.input_ids)
