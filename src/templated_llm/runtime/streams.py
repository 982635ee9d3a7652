"""Streams that clean up when closed, even before their first chunk.

A generator closed (or dropped) before it starts runs none of its own ``finally``: a stream
whose work already began outside it (a sequence queued on the engine, a trace span opened)
would leak that work. :class:`Stream` runs the cleanup for that case itself.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import TypeVar

T = TypeVar("T")


class Stream(Iterator[T]):
    """``chunks``, with ``unstarted_close`` run when the stream is closed or collected before
    its first chunk (once started, the generator's own ``finally`` cleans up).

    ``cancel`` stops the generation from any thread: a generator cannot be closed while another
    thread is inside it, which a consumer waiting for its next chunk is.
    """

    def __init__(self, chunks: Generator[T, None, None], unstarted_close: Callable[[], None],
                 cancel: Callable[[], None] | None = None) -> None:
        self._chunks = chunks
        self._unstarted_close: Callable[[], None] | None = unstarted_close
        self._cancel = cancel

    def cancel(self) -> None:
        """Stop the generation; the stream then ends at once (thread-safe)."""
        if self._cancel is not None:
            self._cancel()

    def __iter__(self) -> Stream[T]:
        return self

    def __next__(self) -> T:
        self._unstarted_close = None  # from here the generator cleans up after itself
        return next(self._chunks)

    def close(self) -> None:
        cleanup, self._unstarted_close = self._unstarted_close, None
        try:
            self._chunks.close()
        finally:
            if cleanup is not None:
                cleanup()

    def __del__(self) -> None:
        # Dropped unread (a client gone before the first chunk): free what it holds.
        if getattr(self, "_unstarted_close", None) is not None:
            self.close()
