"""The hooks a templated-llm plugin can implement.

Every hook that concerns one model receives its :class:`~templated_llm.spec.ModelSpec`; a plugin
returns ``None`` for models that are not its own. The core calls each hook's implementations one
at a time in pluggy's order (``manager.answers``): last-registered first (``tryfirst`` and
``trylast`` respected), the core's generic Hugging Face implementations last.

What the dispatcher does, for every hook but ``register_models`` (whose implementation, if it
raises, leaves its plugin skipped with a ``PluginLoadWarning``): an implementation that raises a
:class:`~templated_llm.errors.TemplatedLLMError` (such as ``AttentionUnavailableError``) stops
the call, and the error reaches the caller unchanged; any other exception stops the call too and
reaches the caller as a :class:`~templated_llm.errors.PluginError` naming the plugin and the
hook, the original chained as its ``__cause__``. An answer of the wrong kind (a ``load_model``
answer that is no ``torch.nn.Module``, ...) is a ``PluginError`` naming the plugin, what it
answered and what the hook must answer. Hook wrappers (which the core would not run),
implementations of hooks not specified here and implementations taking arguments their hook
does not pass are refused at registration (``optionalhook=True`` lets an implementation of a
hook this version lacks through, uncalled).
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
    """Call ``register(ModelSpec(...))`` once for every model this plugin serves.

    Every implementation is called; return values are ignored. ``register`` raises
    ``PluginError`` when another plugin already registered the name.
    """


@hookspec(firstresult=True)
def prompt_template(spec: ModelSpec) -> str | Path | None:
    """Return the path of the Jinja prompt template for ``spec``.

    The first non-``None`` return is used; the core's default finds ``spec.template`` among the
    shipped templates or as a path.
    """


@hookspec(firstresult=True)
def select_attention(
    spec: ModelSpec, requested: str, device: str, snapshot: Path | None
) -> str | None:
    """Resolve a requested attention backend to the concrete one to run on ``device``.

    ``requested`` is ``auto`` or a name of the attention table
    (:mod:`templated_llm.plugins.attention`), already validated by the core. Return a name of
    the table, never ``auto``: the first non-``None`` return is the backend passed to
    ``load_model`` and ``configure_attention``, and the one the loaded model reports. Raise
    :class:`~templated_llm.errors.AttentionUnavailableError` saying what is missing when the
    backend cannot run (:func:`~templated_llm.plugins.attention.resolve` does both).
    ``snapshot`` is the local snapshot directory when one is known (always at load time; at
    log time only when a local snapshot was given), so the model's own support can be checked
    too.
    """


@hookspec(firstresult=True)
def needs_remote_code(spec: ModelSpec, snapshot: Path) -> str | None:
    """Say whether loading ``spec`` from ``snapshot`` would run Python code shipped in it.

    Return a sentence naming the file and class that would run, or ``""`` when this plugin's
    loaders run no snapshot code (for example because they use a native transformers class).
    The first non-``None`` return is used. Called at log time, before anything is logged;
    without the user's ``trust_remote_code`` opt-in a non-empty answer refuses the snapshot.
    """


@hookspec(firstresult=True)
def load_tokenizer(spec: ModelSpec, snapshot: Path, trust_remote_code: bool) -> Any:
    """Load and return the tokenizer from a local snapshot directory.

    The first non-``None`` return is used (the core then sets left padding and a pad token).
    ``trust_remote_code`` is the user's logged opt-in; an implementation may leave it out of
    its parameters if it never runs snapshot code.
    """


@hookspec(firstresult=True)
def load_model(
    spec: ModelSpec, snapshot: Path, dtype: Any, device: str, attention: str, trust_remote_code: bool
) -> Any:
    """Load the causal LM from ``snapshot`` on ``device`` in ``dtype``, in eval mode.

    The first non-``None`` return is the model. ``attention`` is the backend
    :func:`select_attention` chose; ``trust_remote_code`` is as for :func:`load_tokenizer`.
    """


@hookspec(firstresult=True)
def configure_attention(spec: ModelSpec, model: Any, attention: str) -> str | None:
    """Install ``attention`` into the loaded ``model`` if loading did not; return the backend
    now in use.

    The first non-``None`` return ends the call; the core raises
    :class:`~templated_llm.errors.AttentionUnavailableError` when it is not ``attention``. The
    core's default reads the backend transformers installed at load.
    """


@hookspec
def prepare_model(spec: ModelSpec, model: Any, tokenizer: Any) -> None:
    """Adjust a loaded model, or the token ids in ``model.generation_config`` (its end tokens).

    Other generation fields set here (``num_beams``, ``temperature``, ...) are dropped with a
    warning, as the generation engine would not apply them: output-changing defaults belong in
    the spec's ``generation_defaults``, which are request params too.

    Called once per load, after the attention backend is installed, for every implementation
    (not first-result): each returns ``None`` and changes ``model`` in place, for its own
    models only.
    """


@hookspec(firstresult=True)
def engine_adapter(spec: ModelSpec, model: Any, attention: str) -> Any:
    """Return a ``templated_llm.engine.ModelAdapter`` that runs ``model`` on the
    continuous-batching engine, or ``None`` if it cannot: the model then generates whole batches
    with transformers' ``generate`` (logged once at load). ``attention`` is the backend in use.
    """
