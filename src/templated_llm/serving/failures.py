"""What a failed generation is answered with: every exception as a RequestError with its status."""

from __future__ import annotations

import logging
import re

from mlflow.exceptions import MlflowException

from templated_llm.errors import OverloadedError, RequestError

_logger = logging.getLogger("templated_llm.serving")
# Where a model's message names the request field at fault, the first that matches: "param
# 'top_p': ...", "... with max_tokens=300 that exceeds ...", "messages at row 0: ...", "the prompt
# at row 0 is ... characters" (the row's text is at fault only where no setting is named).
_PARAMS = [re.compile(p) for p in (r"param '(\w+)'", r"\b(max_tokens)=", r"^(?:the )?(messages|prompt) at row")]
# The engine's queue-full error by name too, whatever base it is given.
_OVERLOADED_NAMES = {"EngineFullError"}

TIMEOUT = RequestError("the request took longer than the server's --request-timeout",
                       status=504, type="timeout", code="timeout")
# 499, as nginx logs a client that closed its connection; nobody reads the answer.
CLIENT_GONE = RequestError("the client closed the connection; the request was cancelled",
                           status=499, type="cancelled", code="cancelled")
SHUTTING_DOWN = RequestError("the server is shutting down; the request was cancelled. Retry it",
                             status=503, type="server_error", code="shutting_down")


def as_request_error(exc: BaseException, aliases: dict[str, str] | None = None, chat: bool = False) -> RequestError:
    """``exc`` as the RequestError to answer; ``aliases`` rename a param the model names (its
    ``max_tokens``) to the request field that set it (``max_completion_tokens``). In a chat
    request the prompt the model refuses is the templated conversation: its field is ``messages``."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, OverloadedError) or _OVERLOADED_NAMES & {c.__name__ for c in type(exc).__mro__} \
            or isinstance(exc, MlflowException) and exc.get_http_status_code() == 429:
        return RequestError(f"the server is at capacity: {exc}. Retry later", status=429,
                            type="rate_limit_error", code="queue_full")
    if isinstance(exc, MlflowException) and exc.get_http_status_code() == 400:
        message = exc.message
        param = next((found.group(1) for pattern in _PARAMS if (found := pattern.search(message))), None)
        if chat and param == "prompt":
            param = "messages"
        alias = (aliases or {}).get(param)
        if alias is None:
            return RequestError(message, param=param)
        return RequestError(re.sub(rf"\b{param}\b", alias, message), param=alias)
    _logger.error("generation failed", exc_info=exc)
    return RequestError(f"generation failed ({type(exc).__name__}); the server log has the details",
                        status=500, type="server_error", code="generation_failed")
