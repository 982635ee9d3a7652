"""MLflow's scoring app as this server mounts it, with three repairs: a request the model refused
stays a 4xx when MLflow fails to quote its input; a body sent without a Content-Type is MLflow's
415 for a content type it does not take, and JSON nested too deeply to parse a 400 (MLflow
itself fails on both with a 500).

MLflow's ``/invocations`` prefixes the message of an ``MlflowException`` raised by the model with
the input DataFrame (``f"Failed to predict data '{data}'"``). On pandas 3.0 that repr itself raises
``UnicodeEncodeError`` when a cell holds text with a lone surrogate (valid JSON, ``"\\udcff"``):
its column-width code builds an Arrow string array, which must be UTF-8. The model's 400 then
became Starlette's 500 "Internal Server Error". By the time the exception leaves the app Starlette
has already sent that 500, so a 500 response is held back here until the app finishes. Other
5xx are MLflow's own answers, sent at once: its 504 at the request timeout comes while the
generation it gave up on still runs (MLflow cannot cancel it), and the app returns only after.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import Response
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from mlflow.pyfunc.scoring_server import CONTENT_TYPES

from templated_llm.serving.gate import ASGIApp, Receive, Scope, Send

_logger = logging.getLogger("templated_llm.serving")


class KeepRefusals:
    """ASGI middleware around MLflow's scoring app (see the module's docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        if scope["method"] == "POST" and scope["path"] == "/invocations" and \
                not any(name == b"content-type" for name, _ in scope["headers"]):
            await Response(f"This predictor only supports the following content types: Types: {CONTENT_TYPES}. "
                           "Got no Content-Type header.", status_code=415, media_type="text/plain"
                           )(scope, receive, send)
            return
        held: list[dict[str, Any]] = []

        async def hold_errors(message: dict[str, Any]) -> None:
            if held or message["type"] == "http.response.start" and message["status"] == 500:
                held.append(message)
            else:
                await send(message)

        try:
            await self._app(scope, receive, hold_errors)
        except Exception as exc:
            refusal = _refusal_behind(exc)
            if refusal is None:
                for message in held:
                    await send(message)
                raise
            _logger.warning("the model refused the request (%s); MLflow's message quoting the input "
                            "failed with %s, so it is answered without the quote",
                            refusal.error_code, type(exc).__name__)
            # What MLflow's own handler (_async_catch_mlflow_exception) answers for it.
            await Response(refusal.serialize_as_json(), status_code=refusal.get_http_status_code(),
                           media_type="application/json")(scope, receive, send)
            return
        for message in held:
            await send(message)


def _refusal_behind(exc: BaseException) -> MlflowException | None:
    """The client error that ``exc`` was raised while handling, if any: an ``MlflowException``
    under 500, or the ``RecursionError`` of JSON nested too deeply to parse (MLflow's JSON
    decoding catches only ``JSONDecodeError`` and ``UnicodeDecodeError``)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, MlflowException) and cause.get_http_status_code() < 500:
            return cause
        if isinstance(cause, RecursionError):
            return MlflowException("the body's JSON is nested deeper than the server can parse; "
                                   "send a flatter document", error_code=BAD_REQUEST)
        cause = cause.__cause__ or cause.__context__
    return None
