"""Discovers plugins (entry points and in-code registration) and dispatches hooks to them.

pluggy holds the plugins and orders each hook's implementations; the core calls them one at a
time through :func:`answers` (or :func:`first_answer`), so that a plugin's exception becomes a
:class:`PluginError` naming the plugin and the hook, and the core can name the plugin whose
answer it refuses (see :mod:`templated_llm.plugins.hookspecs`). Hook wrappers are refused at
registration (the core would not run them), and so are implementations of hooks that do not
exist, or taking arguments their hook does not pass (misspellings pluggy would keep, and never
call).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from types import FrameType, ModuleType
from typing import Any

import pluggy

from templated_llm.errors import PluginError, PluginLoadWarning, TemplatedLLMError, UnknownModelError
from templated_llm.plugins import hf_defaults, hookspecs
from templated_llm.plugins.plugin_code import code_digest, package_dir
from templated_llm.spec import ModelSpec

_logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "templated_llm"
# Comma-separated entry-point names to load; unset loads all of them, an empty value loads none.
PLUGINS_ENV_VAR = "TEMPLATED_LLM_PLUGINS"
_DEFAULTS_NAME = "templated_llm.plugins.hf_defaults"


@dataclass(frozen=True)
class PluginLoadError:
    """An entry-point plugin that could not be loaded, and why."""

    name: str
    entry_point: str
    error: str


@dataclass(frozen=True)
class PluginInfo:
    """What ``templated-llm plugins`` shows of one registered plugin."""

    name: str
    distribution: str | None  # None: registered in code, not through an entry point
    version: str | None
    models: list[ModelSpec]
    hooks: list[str]


_manager: pluggy.PluginManager | None = None
_load_errors: list[PluginLoadError] = []
_distributions: dict[str, importlib.metadata.Distribution] = {}
# Model names more than one plugin registers: the plugins, in the order they registered it.
_conflicts: dict[str, list[str]] = {}
# Plugins registered from the running script (``__main__``): the line of the script's top-level
# statement that registered each, which log_llm checks runs where the model loads.
_main_registrations: dict[str, int | None] = {}
# The logged model's plugin module being imported now, if one is: plugins registered meanwhile
# are named after it, so two models' plugins of one name load side by side.
_importing_shipped: ContextVar[str | None] = ContextVar("importing_shipped", default=None)
# The plugin modules logged models carried, imported in this process (whatever their naming).
_shipped: set[str] = set()


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, loading entry-point plugins on first use."""
    global _manager
    if _manager is None:
        manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        manager.add_hookspecs(hookspecs)
        manager.register(hf_defaults, name=_DEFAULTS_NAME)
        _manager = manager
        _load_entry_points(manager)
    return _manager


def hooks() -> Any:
    """The hooks, to call by name: ``hooks().load_tokenizer(spec=..., ...)``."""
    return get_plugin_manager().hook


def _selected_entry_points() -> set[str] | None:
    value = os.environ.get(PLUGINS_ENV_VAR)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    selected = _selected_entry_points()
    found = set()
    loaded: dict[str, importlib.metadata.EntryPoint] = {}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.add(entry_point.name)
        if selected is not None and entry_point.name not in selected:
            continue
        if manager.has_plugin(entry_point.name):
            first = loaded.get(entry_point.name)
            if first is not None and first.value != entry_point.value:
                # Two distributions under one entry-point name: only the first found loads.
                warnings.warn(
                    f"two installed distributions name a templated-llm plugin {entry_point.name!r}: "
                    f"{_dist_name(first)} ({first.value}) was loaded and {_dist_name(entry_point)} "
                    f"({entry_point.value}) skipped. Uninstall one, or rename its entry point",
                    PluginLoadWarning, stacklevel=2)
            continue
        try:
            _register(manager, entry_point.load(), entry_point.name)
            _distributions[entry_point.name] = entry_point.dist
            loaded[entry_point.name] = entry_point
        except Exception as exc:  # a broken plugin must not take the others down
            error = PluginLoadError(entry_point.name, entry_point.value, f"{type(exc).__name__}: {exc}")
            _load_errors.append(error)
            warnings.warn(
                f"templated-llm plugin {error.name!r} ({error.entry_point}) failed to load and "
                f"was skipped: {error.error}",
                PluginLoadWarning,
                stacklevel=2,
            )
    for missing in sorted((selected or set()) - found):
        warnings.warn(
            f"{PLUGINS_ENV_VAR} names {missing!r}, but no installed plugin has that entry point; "
            f"installed: {sorted(found) or 'none'}",
            PluginLoadWarning,
            stacklevel=2,
        )


def _dist_name(entry_point: importlib.metadata.EntryPoint) -> str:
    return getattr(entry_point.dist, "name", None) or "an unknown distribution"


def _register(manager: pluggy.PluginManager, plugin: object, name: str | None) -> str:
    name = name or manager.get_canonical_name(plugin)
    if manager.is_registered(plugin):
        raise PluginError(f"plugin {plugin!r} is already registered, as {manager.get_name(plugin)!r}")
    if manager.has_plugin(name):
        raise PluginError(f"a plugin named {name!r} is already registered ({manager.get_plugin(name)!r}); "
                          "register this one under another name")
    _check_implementations(manager, plugin, name)
    manager.register(plugin, name=name)
    return name


def _hook_names() -> list[str]:
    return [name for name in dir(hookspecs)
            if hasattr(getattr(hookspecs, name), f"{hookspecs.PROJECT_NAME}_spec")]


def _check_implementations(manager: pluggy.PluginManager, plugin: object, name: str) -> None:
    """Refuse ``plugin`` unless each of its implementations is a plain one of an existing hook,
    taking only arguments that hook passes."""
    for attribute in dir(plugin):
        opts = manager.parse_hookimpl_opts(plugin, attribute)
        if opts is None:
            continue
        hook = opts.get("specname") or attribute
        caller = getattr(manager.hook, hook, None)
        if caller is None or not caller.has_spec():
            if opts.get("optionalhook"):
                continue  # a hook of another templated-llm version, by design never called here
            known = _hook_names()
            close = difflib.get_close_matches(hook, known, n=1)
            meant = f" (did you mean {close[0]!r}?)" if close else ""
            raise PluginError(f"plugin {name!r} implements {hook!r}, which is not a templated-llm "
                              f"hook{meant}; the hooks: {', '.join(known)}")
        passed = caller.spec.argnames
        unknown = [arg for arg in pluggy.HookImpl(plugin, name, getattr(plugin, attribute), opts).argnames
                   if arg not in passed]
        if unknown:
            raise PluginError(f"plugin {name!r} implements hook {hook!r} with arguments {unknown} the "
                              f"hook does not pass; it passes {list(passed)}")
        if opts.get("wrapper") or opts.get("hookwrapper"):
            raise PluginError(
                f"plugin {name!r} implements hook {hook!r} as a wrapper; templated-llm hooks take "
                "plain implementations (order them with tryfirst or trylast)"
            )


def reset_plugin_manager() -> None:
    """Forget every registered plugin; the next call rediscovers entry points."""
    global _manager
    _manager = None
    _load_errors.clear()
    _distributions.clear()
    _main_registrations.clear()
    _shipped.clear()


def plugin_load_errors() -> list[PluginLoadError]:
    """Entry-point plugins that failed to load in this process."""
    get_plugin_manager()
    return list(_load_errors)


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin defined in code (a module, class or instance with ``@hookimpl`` functions).

    Returns the name it was registered under: ``name``, or, for a plugin registered by the plugin
    module a logged model carries while that model loads, ``name@module``.
    """
    if shipped := _importing_shipped.get():
        name = f"{name or get_plugin_manager().get_canonical_name(plugin)}@{shipped}"
    registered = _register(get_plugin_manager(), plugin, name)
    if _module_name(plugin) == "__main__":
        _main_registrations[registered] = main_statement_line()
    return registered


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered under ``name``."""
    get_plugin_manager().unregister(name=name)
    _main_registrations.pop(name, None)


def main_registration_line(name: str) -> int | None:
    """For a plugin registered from ``__main__``: the line of the script's top-level statement
    that registered it (``None`` if unknown)."""
    return _main_registrations.get(name)


def main_statement_line() -> int | None:
    """The line of the top-level statement of ``__main__`` that is running now, if one is."""
    main = getattr(sys.modules.get("__main__"), "__dict__", None)
    return next((frame.f_lineno for frame in _stack_frames()
                 if frame.f_globals is main and frame.f_code.co_name == "<module>"), None)


def plugin_names() -> list[str]:
    """Names of the registered plugins, the core's own excluded."""
    return [name for name, _ in get_plugin_manager().list_name_plugin()
            if name != _DEFAULTS_NAME]


def plugin_info() -> list[PluginInfo]:
    """Every registered plugin: its distribution, the models it registers, the hooks it implements."""
    manager = get_plugin_manager()
    specs = model_specs()
    infos = []
    for name in plugin_names():
        plugin = manager.get_plugin(name)
        distribution = _distributions.get(name)
        infos.append(PluginInfo(
            name=name,
            distribution=distribution.name if distribution else None,
            version=distribution.version if distribution else None,
            models=[spec for spec in specs.values() if spec.plugin_name == name],
            hooks=sorted(caller.name for caller in manager.get_hookcallers(plugin) or []),
        ))
    return infos


def _module_name(plugin: object) -> str:
    if isinstance(plugin, ModuleType):
        return plugin.__name__
    return getattr(plugin, "__module__", None) or type(plugin).__module__


def _stack_frames() -> Iterator[FrameType]:
    # Innermost first, from the caller of the caller on.
    frame = sys._getframe(2)
    while frame is not None:
        yield frame
        frame = frame.f_back


def _call(impl: pluggy.HookImpl, **kwargs: Any) -> Any:
    # As pluggy calls an implementation: with the arguments it names.
    return impl.function(*[kwargs[arg] for arg in impl.argnames])


def answers(hook_name: str, **kwargs: Any) -> Iterator[tuple[Any, str]]:
    """Call hook ``hook_name``'s implementations one at a time, in pluggy's order (``tryfirst``,
    then the last registered first, then ``trylast``; the core's Hugging Face defaults last),
    yielding each answer and the plugin that gave it.

    A :class:`TemplatedLLMError` an implementation raises reaches the caller as is; any other
    exception as a :class:`PluginError` naming the plugin and the hook, the original chained.
    """
    for impl in reversed(getattr(hooks(), hook_name).get_hookimpls()):
        try:
            answer = _call(impl, **kwargs)
        except TemplatedLLMError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {impl.plugin_name!r} failed in hook {hook_name!r}: "
                              f"{type(exc).__name__}: {exc}") from exc
        yield answer, impl.plugin_name


def first_answer(hook_name: str, **kwargs: Any) -> tuple[Any, str | None]:
    """The first non-``None`` answer of first-result hook ``hook_name`` and the plugin that gave
    it (``None, None`` when none did); the later implementations are not called."""
    return next(((answer, plugin) for answer, plugin in answers(hook_name, **kwargs) if answer is not None),
                (None, None))


def model_specs() -> dict[str, ModelSpec]:
    """Every model the registered plugins serve, by name.

    Each plugin's ``register_models`` runs on its own: one that raises is skipped (with a
    warning, and listed by :func:`plugin_load_errors`) and the others' models stay served; a
    model name two plugins register is left out, and asking for it says which plugins."""
    specs: dict[str, ModelSpec] = {}
    _conflicts.clear()
    # In pluggy's calling order: the last registered first.
    for impl in reversed(hooks().register_models.get_hookimpls()):
        registered: list[ModelSpec] = []

        def register(spec: ModelSpec, impl: pluggy.HookImpl = impl, into: list = registered) -> None:
            if not isinstance(spec, ModelSpec):
                raise PluginError(f"register() takes a ModelSpec, received {type(spec).__name__}")
            into.append(spec.model_copy(update={"plugin_name": impl.plugin_name,
                                                "plugin_module": _module_name(impl.plugin)}))

        try:
            _call(impl, register=register)
        except Exception as exc:  # a broken plugin must not take the others' models down
            _skip_failed(impl.plugin_name, "register_models", exc)
            continue
        for spec in registered:
            if spec.name in specs:
                _conflicts[spec.name] = [specs.pop(spec.name).plugin_name]
            if spec.name in _conflicts:
                _conflicts[spec.name].append(spec.plugin_name)
            else:
                specs[spec.name] = spec
    return specs


def _import_shipped(module_name: str) -> None:
    """Import and register the plugin module a logged model carries; the plugins it registers
    are named after it (see :func:`register_plugin`)."""
    manager = get_plugin_manager()
    importing = _importing_shipped.set(module_name)
    try:
        module = importlib.import_module(module_name)
        _shipped.add(module_name)
        if not manager.is_registered(module):
            _register(manager, module, module_name)
    finally:
        _importing_shipped.reset(importing)


def _check_imported_code(name: str, module_name: str, digest: str) -> None:
    """Refuse (or, for an installed plugin, warn) where the code imported as ``module_name`` is
    not the code model ``name`` was logged with."""
    where = package_dir(module_name)
    if where is None or code_digest(where) == digest:
        return
    if module_name in _shipped:
        raise PluginError(
            f"model {name!r} carries its plugin code as {module_name!r}, but this process has "
            f"already imported a different {module_name!r}, from {where} (the copy another logged "
            "model carried), and Python imports a module name once per process: this model would "
            "run that code instead of its own. Load the two models in separate processes, or give "
            "one of the two plugin packages another name."
        )
    _logger.warning("model %r was logged with other plugin code than the installed %r it runs "
                    "here (from %s): a newer version of the plugin, say", name, module_name, where)


def _skip_failed(plugin: str, hook: str, exc: BaseException) -> None:
    error = PluginLoadError(plugin, f"hook {hook}", f"{type(exc).__name__}: {exc}")
    if error not in _load_errors:
        _load_errors.append(error)
        warnings.warn(f"templated-llm plugin {plugin!r} failed in hook {hook!r}, and its models "
                      f"were skipped: {error.error}", PluginLoadWarning, stacklevel=3)


def get_model_spec(name: str, plugin_module: str | None = None, plugin_digest: str | None = None) -> ModelSpec:
    """Find the spec of model ``name``.

    When no registered plugin serves it and ``plugin_module`` is given (as recorded in a logged
    model), that module is imported and registered first: this is how a logged model loads where
    its plugin travels in the model's ``code_paths`` instead of being installed. A model whose
    name the plugin module another logged model carried serves here is refused: the hooks would
    run that model's plugin code, not this one's. So is one whose ``plugin_digest`` (of the code
    it carries) differs from the code imported under ``plugin_module`` from another logged
    model; an installed plugin that differs is run, with a warning.
    """
    specs = model_specs()
    if name not in specs and plugin_module:
        _import_shipped(plugin_module)
        specs = model_specs()
    if plugin_digest and (name not in specs or specs[name].plugin_module == plugin_module):
        _check_imported_code(name, plugin_module, plugin_digest)
    if name in specs:
        served_by = specs[name].plugin_module
        if plugin_module and served_by != plugin_module and served_by in _shipped:
            raise PluginError(
                f"model {name!r} is served in this process by the plugin code another logged model "
                f"carried ({served_by}); this model carries its own ({plugin_module}), and one "
                "process serves a model name with one plugin. Load the two models in separate "
                "processes, or log them under different model names."
            )
        return specs[name]
    if name in _conflicts:
        raise PluginError(
            f"model name {name!r} is registered by two plugins: "
            f"{' and '.join(repr(p) for p in _conflicts[name])}. Uninstall one, or choose which "
            f"plugins load with {PLUGINS_ENV_VAR}."
        )
    failed = "".join(f"\n  plugin {e.name!r} failed to load: {e.error}" for e in _load_errors)
    raise UnknownModelError(
        f"no installed templated-llm plugin serves model {name!r}; available models: "
        f"{sorted(specs) or 'none'}{failed}"
    )
