"""A request's sequences, each generating on a thread, their output read on the event loop.

Generation blocks (a ``predict`` call, a stream's next chunk), so each sequence runs on a thread of
its own and posts what it yields, tagged with its index, to one asyncio queue. The request
reads the queue, so a timeout, a shutdown or a client gone is one event among the others:
:meth:`Generations.interrupt` posts it, :meth:`Generations.cancel` stops the sequences: at once
where their iterator has a thread-safe ``cancel()`` (a stream), else at their next item.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

_logger = logging.getLogger(__name__)

class _Signal:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: Posted once a sequence's iterator exists: its input was accepted (validated, queued).
ACCEPTED = _Signal("ACCEPTED")
#: Posted when a sequence's thread is done.
FINISHED = _Signal("FINISHED")


class InFlight:
    """How many sequences are generating or waiting, bounded; thread-safe."""

    def __init__(self, limit: int, on_change: Callable[[int], None] = lambda count: None) -> None:
        self.limit = limit
        self._count = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._on_change = on_change

    def try_acquire(self, count: int) -> bool:
        with self._lock:
            if self._count + count > self.limit:
                return False
            self._count += count
            self._on_change(self._count)
            return True

    def release(self) -> None:
        with self._lock:
            self._count -= 1
            self._on_change(self._count)
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Whether every sequence finished within ``timeout`` seconds."""
        with self._lock:
            return self._idle.wait_for(lambda: self._count == 0, timeout)


class Generations:
    """The sequences of one request. :meth:`next` gives ``(index, item)`` pairs: ``item`` is
    ``ACCEPTED``, what the sequence yielded, an exception it raised, then ``FINISHED``; index -1
    carries what :meth:`interrupt` posted."""

    def __init__(self, in_flight: InFlight) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._in_flight = in_flight
        self._lock = threading.Lock()
        self._running: dict[int, Iterator[Any] | None] = {}  # started, not yet finished
        self._cancellable: set[int] = set()

    def start(self, index: int, open_: Callable[[], Iterator[Any]], cancellable: bool) -> None:
        """Run ``open_()`` and iterate what it returns on a new thread (one ``in_flight`` slot,
        acquired by the caller, is released when it ends). ``cancellable``: what it returns has
        a thread-safe ``cancel()`` (a stream); else it runs to its end once started."""
        with self._lock:
            self._running[index] = None
            if cancellable:
                self._cancellable.add(index)
        threading.Thread(target=self._run, args=(index, open_), name=f"templated-llm-seq-{index}",
                         daemon=True).start()

    def _run(self, index: int, open_: Callable[[], Iterator[Any]]) -> None:
        iterator = None
        try:
            iterator = open_()
            with self._lock:
                self._running[index] = iterator
            if self._cancelled.is_set():
                _cancel(iterator)  # cancelled while it was being opened
            self._post(index, ACCEPTED)
            for item in iterator:
                self._post(index, item)
                if self._cancelled.is_set():
                    break
        except Exception as exc:  # noqa: BLE001 - handed to the request, which answers it
            self._post(index, exc)
        finally:
            if iterator is not None:
                try:
                    _close(iterator)  # a generation stopped early frees its slot
                except Exception:  # noqa: BLE001 - nobody waits for this one any more
                    _logger.exception("closing a cancelled generation failed")
            with self._lock:
                del self._running[index]
            self._in_flight.release()
            self._post(index, FINISHED)

    def _post(self, index: int, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is reading
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, item))

    def interrupt(self, reason: BaseException) -> None:
        """Post ``reason`` to the reader (thread-safe)."""
        self._post(-1, reason)

    def cancel(self) -> list[int]:
        """Stop every sequence still running; returns the indexes of those stopped (a whole
        completion generating, which cannot be cut short, is not)."""
        self._cancelled.set()
        with self._lock:
            running = dict(self._running)
        for iterator in running.values():
            _cancel(iterator)  # one still opening is cancelled once open
        return [index for index in running if index in self._cancellable]

    async def next(self) -> tuple[int, Any]:
        """The next ``(index, item)``."""
        return await self._queue.get()


def _cancel(iterator: Iterator[Any] | None) -> None:
    cancel = getattr(iterator, "cancel", None)
    if callable(cancel):
        cancel()


def _close(iterator: Iterator[Any]) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
