"""OpenAI response bodies, stream chunks as Server-Sent Events, and error objects."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from templated_llm.runtime.completions import Completion

#: The event that ends a stream.
DONE = b"data: [DONE]\n\n"


def _json(document: Any) -> bytes:
    # ASCII escapes: text with lone surrogates (valid JSON escapes) still encodes.
    return json.dumps(document, separators=(",", ":")).encode()


def error_object(message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_body(message: str, **fields: Any) -> bytes:
    return _json(error_object(message, **fields))


def error_event(message: str, **fields: Any) -> bytes:
    """An error inside a stream, as OpenAI sends one: the SDKs raise it."""
    return b"data: " + _json(error_object(message, **fields)) + b"\n\n"


def usage(completions: Sequence[Completion], n: int) -> dict[str, int]:
    """Token counts of a request: each prompt once (every ``n`` choices share one), every choice."""
    prompt = sum(c.prompt_tokens for c in completions[::n])
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


@dataclass
class Reply:
    """The bodies of one answer: ``chat`` (``chat.completion``) or text (``text_completion``)."""

    chat: bool
    model: str
    fingerprint: str
    include_usage: bool = False  # stream_options.include_usage
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def whole(self, completions: Sequence[Completion], n: int) -> bytes:
        """The non-streamed answer, one choice per completion."""
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None,
                                                "annotations": []},
                        "logprobs": None, "finish_reason": c.finish_reason}
                       for i, c in enumerate(completions)]
            head = self._head("chat.completion")
        else:
            choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                       for i, c in enumerate(completions)]
            head = self._head("text_completion")
        return _json({**head, "choices": choices, "usage": usage(completions, n)})

    def chunk(self, index: int, text: str = "", finish_reason: str | None = None,
              first: bool = False) -> bytes:
        """One stream event: a choice's text, or (``finish_reason``) its end; ``first`` opens a
        chat choice with the assistant's role."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._event([choice])

    def usage_chunk(self, completions: Sequence[Completion], n: int) -> bytes:
        """The last event when ``include_usage``: no choices, the request's usage."""
        return self._event([], usage(completions, n))

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        body = {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return b"data: " + _json(body) + b"\n\n"
