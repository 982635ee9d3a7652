"""What the HTTP server asks of a loaded model: complete a row, stream a row, engine stats.

The server sees only :class:`Backend`, so it does not care how generation runs: through
``TemplatedLLM.complete`` (``predict``'s rows, whatever task the model was logged with) and
``TemplatedLLM.generate_stream``, on the engine when the model has one.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from templated_llm.runtime.completions import Completion
from templated_llm.runtime.inputs import Row
from templated_llm.spec import ModelSpec

__all__ = ["Backend", "Completion", "LoadedModel", "TemplatedLLMBackend", "load", "registered_name"]


class Backend(Protocol):
    """Generation for one served model. ``params`` are ``predict``'s params (template variables
    included); bad input raises ``MlflowException`` (HTTP 400) before anything generates, naming
    the row by ``index``, its place in the request."""

    spec: ModelSpec
    #: Most sequences one request may ask for (prompts times ``n``).
    max_rows: int
    #: Whether a whole completion is better read from :meth:`stream` (cancellable at once)
    #: than from :meth:`complete` (where concurrent completions may share a batch).
    streams_completions: bool

    def complete(self, row: Row, params: dict[str, Any], index: int) -> Completion: ...

    def stream(self, row: Row, params: dict[str, Any], index: int, text: bool = True
               ) -> Iterator[str | Completion]:
        """Text deltas as they are generated (none with ``text=False``), then the
        :class:`Completion`; closing the iterator, or its ``cancel()``, cancels the generation."""
        ...

    def stats(self) -> Any | None:
        """The engine's stats object, or None where generation does not run on an engine."""
        ...

    def tracing_warning(self) -> str | None:
        """What tracing every request costs this server, where it is worth a warning at start."""
        ...


class TemplatedLLMBackend:
    """A :class:`Backend` over a loaded ``TemplatedLLM``."""

    def __init__(self, model: Any) -> None:
        if not callable(getattr(model, "generate_stream", None)):
            raise TypeError(
                f"the model is a {type(model).__name__}, not a TemplatedLLM logged by log_llm: "
                "serve it with 'templated-llm serve --mlflow-only'"
            )
        self._model = model
        self.spec: ModelSpec = model.spec
        self.max_rows: int = model.config.max_rows_per_request
        # The engine batches every sequence however it comes; whole batches merge only
        # completions that come through predict.
        self.streams_completions: bool = getattr(model, "engine", None) is not None

    def complete(self, row: Row, params: dict[str, Any], index: int) -> Completion:
        # As predict (traced, on the engine), whatever MLflow task the model was logged with.
        [completion] = self._model.complete(_model_input(row), params, first_row=index)
        return completion

    def stream(self, row: Row, params: dict[str, Any], index: int, text: bool = True
               ) -> Iterator[str | Completion]:
        return self._model.generate_stream(_model_input(row), params, text=text, first_row=index)

    def stats(self) -> Any | None:
        engine = getattr(self._model, "engine", None)
        return None if engine is None else engine.stats()

    def tracing_warning(self) -> str | None:
        return self._model.tracer.cost_warning()


def _model_input(row: Row) -> Any:
    return [row] if isinstance(row, str) else {"messages": [row]}


@dataclass(frozen=True)
class LoadedModel:
    backend: Backend
    pyfunc: Any  # mlflow.pyfunc.PyFuncModel: what MLflow's scoring routes serve
    name: str  # the name clients pass as ``model``
    created: int  # when it was loaded, in seconds since the epoch
    fingerprint: str  # OpenAI's system_fingerprint: which logged model answers


def registered_name(model_uri: str) -> str | None:
    """The registered model's name in ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``; None for
    other URIs (``models:/<model id>``, ``runs:/``, paths)."""
    parsed = urllib.parse.urlparse(model_uri)
    if parsed.scheme != "models":
        return None
    path = parsed.path.lstrip("/")
    if "/" in path:
        return path.split("/", 1)[0] or None
    if "@" in path:
        return path.rsplit("@", 1)[0] or None
    return None


def load(model_uri: str, served_model_name: str | None = None) -> LoadedModel:
    """Load ``model_uri`` as ``mlflow models serve`` does (its ``SERVING_MODEL_CONFIG`` included)."""
    from mlflow.pyfunc.scoring_server import load_model_with_mlflow_config

    pyfunc = load_model_with_mlflow_config(model_uri)
    backend = TemplatedLLMBackend(pyfunc.unwrap_python_model())
    uuid = pyfunc.metadata.model_uuid or model_uri
    return LoadedModel(
        backend=backend, pyfunc=pyfunc,
        name=served_model_name or registered_name(model_uri) or backend.spec.name,
        created=int(time.time()), fingerprint=f"fp_{uuid.replace('-', '')[:12]}",
    )
