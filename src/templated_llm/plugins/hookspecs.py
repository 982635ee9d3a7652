"""The hooks a templated-llm plugin can implement.

Every hook that concerns one model receives its :class:`~templated_llm.spec.ModelSpec`; a plugin
returns ``None`` for models that are not its own, so the next implementation (ending with the
core's generic Hugging Face defaults) answers instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy

from templated_llm.spec import ModelSpec

PROJECT_NAME = "templated_llm"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_models(register: Callable[[ModelSpec], None]) -> None:
    """Call ``register(ModelSpec(...))`` once for every model this plugin serves."""


@hookspec(firstresult=True)
def prompt_template(spec: ModelSpec) -> str | Path | None:
    """Return the path of the Jinja prompt template for ``spec``."""


@hookspec(firstresult=True)
def select_attention(
    spec: ModelSpec, requested: str, device: str, snapshot: Path | None
) -> str | None:
    """Resolve a requested attention backend to the concrete one to use on ``device``.

    ``requested`` is one of ``auto``, ``eager``, ``sdpa``, ``triton``, ``flash``. Raise
    ``ValueError`` naming what is missing when the backend cannot run; resolve ``auto`` to the
    best backend available. ``snapshot`` is the local snapshot directory when one is known
    (always at load time; at log time only when a local snapshot was given), so the model's
    own support can be checked too.
    """


@hookspec(firstresult=True)
def needs_remote_code(spec: ModelSpec, snapshot: Path) -> str | None:
    """Say whether loading ``spec`` from ``snapshot`` would run Python code shipped in it.

    Return a sentence naming the file and class that would run, or ``""`` when this plugin's
    loaders run no snapshot code (for example because they use a native transformers class).
    Called at log time, before anything is logged; without the user's ``trust_remote_code``
    opt-in a non-empty answer refuses the snapshot.
    """


@hookspec(firstresult=True)
def load_tokenizer(spec: ModelSpec, snapshot: Path, trust_remote_code: bool) -> Any:
    """Load and return the tokenizer from a local snapshot directory.

    ``trust_remote_code`` is the user's logged opt-in; an implementation may leave it out of
    its parameters if it never runs snapshot code.
    """


@hookspec(firstresult=True)
def load_model(
    spec: ModelSpec, snapshot: Path, dtype: Any, device: str, attention: str, trust_remote_code: bool
) -> Any:
    """Load the causal LM from ``snapshot`` on ``device`` in ``dtype``, in eval mode.

    ``attention`` is the backend returned by :func:`select_attention`; ``trust_remote_code`` is
    as for :func:`load_tokenizer`.
    """


@hookspec(firstresult=True)
def configure_attention(spec: ModelSpec, model: Any, attention: str) -> str | None:
    """Install ``attention`` into a loaded model if loading did not; return the backend in use."""
