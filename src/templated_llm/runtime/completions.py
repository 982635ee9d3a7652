"""The completions stage: generated text ended at its stop strings, with token counts and why it
ended, and the response ``predict`` returns (a ``candidates`` column, usage columns on request).

Streaming holds text back while it could be the start of a stop string, so the chunks join to
the text a whole-batch generation returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
from mlflow.types.schema import ColSpec, Schema

OUTPUT_COLUMN = "candidates"
#: ``finish_reason`` of a generation cancelled before it ended.
CANCELLED = "cancelled"
#: Columns added to ``candidates`` when a request sets ``return_usage``.
USAGE_COLUMNS = ("prompt_tokens", "completion_tokens", "finish_reason")


@dataclass(frozen=True)
class Completion:
    """One row's generated text, its token counts and why it ended (``stop`` or ``length``)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to its first stop string."""
    positions = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(positions)] if positions else text


def held_back_at_stop(chunks: Iterator[str], stop: list[str]) -> Iterator[str]:
    """Streamed ``chunks`` re-cut so that none holds the start of a stop string; ends at one."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        position, complete = _first_stop(pending, stop)
        if position:
            yield pending[:position]
            pending = pending[position:]
        if complete:
            return
    if cut := cut_at_stop(pending, stop):
        yield cut


def stripped(completion: Completion) -> Completion:
    """``completion`` with the whitespace around its text left out."""
    return dataclasses.replace(completion, text=completion.text.strip())


def stripped_stream(chunks: Iterator[str | Completion]) -> Iterator[str | Completion]:
    """A stream's text chunks with the text's leading and trailing whitespace left out, and its
    :class:`Completion` stripped: whitespace is held back until text follows it, so the chunks
    join to the stripped text. No chunk is empty."""
    started, held = False, ""
    for chunk in chunks:
        if isinstance(chunk, Completion):
            yield stripped(chunk)
            continue
        if not started:
            chunk = chunk.lstrip()
            started = bool(chunk)
        text = held + chunk
        body = text.rstrip()
        held = text[len(body):]
        if body:
            yield body


def _first_stop(text: str, stop: list[str]) -> tuple[int, bool]:
    """Where the first stop string in ``text`` starts or may start, and whether it is complete.

    Everything before that position can be sent: no stop string can begin there, whatever
    follows. ``(len(text), False)`` when no stop string begins in ``text`` at all.
    """
    for start in range(len(text)):
        rest = text[start:]
        if any(rest.startswith(s) for s in stop):
            return start, True
        if any(s.startswith(rest) for s in stop):
            return start, False
    return len(text), False


def output_schema() -> Schema:
    """The output schema of a logged model: ``candidates``, what every call returns. The usage
    columns that ``return_usage`` adds are left out: MLflow's ``spark_udf`` makes its default
    result type of every column the schema lists, and reads each from every answer."""
    return Schema([ColSpec("string", OUTPUT_COLUMN)])


def to_frame(completions: list[Completion], usage: bool) -> pd.DataFrame:
    """The response: one row per completion, with the usage columns when ``usage`` is set."""
    columns = {OUTPUT_COLUMN: [c.text for c in completions]}
    if usage:
        columns.update({name: [getattr(c, name) for c in completions] for name in USAGE_COLUMNS})
    return pd.DataFrame(columns)
