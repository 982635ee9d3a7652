"""Exceptions raised by templated-llm, all deriving from :class:`TemplatedLLMError`, and its warnings."""

from __future__ import annotations

from typing import Any


class TemplatedLLMError(Exception):
    """Base class of every templated-llm error."""


class PluginError(TemplatedLLMError):
    """A plugin misbehaved: it failed inside a hook or clashes with another plugin."""


class UnknownModelError(TemplatedLLMError, LookupError):
    """No installed plugin serves the requested model name."""


class SnapshotError(TemplatedLLMError, ValueError):
    """A model snapshot directory is missing or incomplete."""


class RemoteCodeError(SnapshotError):
    """Loading a snapshot would run Python code shipped with it, and that was not allowed."""


class TemplateError(TemplatedLLMError, ValueError):
    """A prompt template is missing, invalid or failed to render."""


class TemplateSecurityError(TemplateError):
    """A prompt template reaches outside the sandbox: private attributes, imports or files."""


class TaskError(TemplatedLLMError, ValueError):
    """A model cannot be logged with the requested MLflow task."""


class AttentionUnavailableError(TemplatedLLMError, ValueError):
    """The requested attention backend cannot run for this model on this machine."""


class DTypeUnavailableError(TemplatedLLMError, ValueError):
    """The requested dtype cannot run on this device."""


class InsufficientMemoryError(TemplatedLLMError, MemoryError):
    """The model would not fit the memory available, so it is not loaded."""


class ConfigError(TemplatedLLMError, ValueError):
    """A setting given to ``log_llm``, or in a ``model_config`` at load, is of the wrong type or
    out of range."""


class PluginLoadWarning(UserWarning):
    """A plugin entry point failed to load and was skipped."""


class RemoteCodeWarning(UserWarning):
    """A model logged with ``trust_remote_code=True`` is being loaded."""


class OverloadedError(TemplatedLLMError):
    """More work is queued than the server or engine takes: retry later (HTTP 429 when served)."""


class RequestError(TemplatedLLMError):
    """An HTTP request to ``templated-llm serve`` cannot be served as sent.

    Answered with ``status`` and OpenAI's error object: ``message``, ``type``, ``param`` (the
    request field at fault, if one is) and ``code``.
    """

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type


class EngineError(TemplatedLLMError):
    """The generation engine could not serve a sequence."""


class EngineFullError(EngineError, OverloadedError):
    """The engine's waiting queue is at its limit: the request is refused (HTTP 429 when served)."""


class EngineClosedError(EngineError):
    """The engine was closed (its model released or the process exiting) before a sequence ended."""


class SequenceFailedError(EngineError):
    """A step of the engine raised while this sequence was in it; other sequences go on."""


class EmulatedDTypeWarning(UserWarning):
    """The requested dtype runs on this CPU without native instructions: slower than float32."""


def user_message(exc: BaseException) -> str | None:
    """The message of an error its user can act on (a bad value, a missing model, a plugin's
    refusal), in one line where it is a pydantic error; ``None`` for anything else, a bug whose
    traceback is what helps."""
    from mlflow.exceptions import MlflowException
    from pydantic import ValidationError

    if isinstance(exc, MlflowException):
        return exc.message
    if isinstance(exc, ValidationError):  # an option's value out of range
        return validation_summary(exc)
    if isinstance(exc, TemplatedLLMError):
        return str(exc)
    return None


def validation_summary(exc: Any) -> str:
    """A pydantic ``ValidationError`` in one line: each field, what is wrong, the value received."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}; received {e['input']!r}"
                     for e in exc.errors(include_url=False))
