"""Discovers plugins (entry points and in-code registration) and dispatches hooks to them."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy

from templated_llm.plugins import hf_defaults, hookspecs
from templated_llm.errors import PluginError, TemplatedLLMError, UnknownModelError
from templated_llm.spec import ModelSpec

ENTRY_POINT_GROUP = "templated_llm"
# Comma-separated entry-point names to load; unset loads all of them, an empty value loads none.
PLUGINS_ENV_VAR = "TEMPLATED_LLM_PLUGINS"
_DEFAULTS_NAME = "templated_llm.plugins.hf_defaults"


class PluginLoadWarning(UserWarning):
    """A plugin entry point failed to load and was skipped."""


@dataclass(frozen=True)
class PluginLoadError:
    """An entry-point plugin that could not be loaded, and why."""

    name: str
    entry_point: str
    error: str


_manager: pluggy.PluginManager | None = None
_load_errors: list[PluginLoadError] = []


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, loading entry-point plugins on first use."""
    global _manager
    if _manager is None:
        manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        manager.add_hookspecs(hookspecs)
        manager.register(hf_defaults, name=_DEFAULTS_NAME)
        _load_entry_points(manager)
        _manager = manager
    return _manager


def _selected_entry_points() -> set[str] | None:
    value = os.environ.get(PLUGINS_ENV_VAR)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    selected = _selected_entry_points()
    found = set()
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.add(entry_point.name)
        if selected is not None and entry_point.name not in selected:
            continue
        if manager.has_plugin(entry_point.name):
            continue
        try:
            manager.register(entry_point.load(), name=entry_point.name)
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


def reset_plugin_manager() -> None:
    """Forget every registered plugin; the next call rediscovers entry points."""
    global _manager
    _manager = None
    _load_errors.clear()


def plugin_load_errors() -> list[PluginLoadError]:
    """Entry-point plugins that failed to load in this process."""
    get_plugin_manager()
    return list(_load_errors)


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin defined in code (a module, class or instance with ``@hookimpl`` functions).

    Returns the name it was registered under.
    """
    manager = get_plugin_manager()
    registered = manager.register(plugin, name=name)
    if registered is None:
        raise PluginError(f"plugin {name or plugin!r} is already registered or blocked")
    return registered


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered under ``name``."""
    get_plugin_manager().unregister(name=name)


def plugin_names() -> list[str]:
    """Names of the registered plugins, the core's defaults excluded."""
    return [name for name, _ in get_plugin_manager().list_name_plugin() if name != _DEFAULTS_NAME]


def _module_name(plugin: object) -> str:
    if isinstance(plugin, ModuleType):
        return plugin.__name__
    return getattr(plugin, "__module__", None) or type(plugin).__module__


def _call(impl: pluggy.HookImpl, hook_name: str, kwargs: dict[str, Any]) -> Any:
    try:
        return impl.function(*[kwargs[arg] for arg in impl.argnames])
    except TemplatedLLMError:
        raise
    except Exception as exc:
        raise PluginError(
            f"plugin {impl.plugin_name!r} failed in hook {hook_name!r}: {type(exc).__name__}: {exc}"
        ) from exc


def call_first(hook_name: str, **kwargs: Any) -> Any:
    """Call a first-result hook, naming the plugin when an implementation raises."""
    # pluggy calls implementations last-registered first (tryfirst/trylast respected); so do we.
    for impl in reversed(getattr(get_plugin_manager().hook, hook_name).get_hookimpls()):
        result = _call(impl, hook_name, kwargs)
        if result is not None:
            return result
    return None


def model_specs() -> dict[str, ModelSpec]:
    """Every model the registered plugins serve, by name."""
    specs: dict[str, ModelSpec] = {}
    for impl in reversed(get_plugin_manager().hook.register_models.get_hookimpls()):
        _call(impl, "register_models", {"register": _spec_collector(impl, specs)})
    return specs


def _spec_collector(impl: pluggy.HookImpl, specs: dict[str, ModelSpec]) -> Callable[[ModelSpec], None]:
    def register(spec: ModelSpec) -> None:
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"register() takes a ModelSpec, received {type(spec).__name__}")
        spec = spec.model_copy(
            update={"plugin_name": impl.plugin_name, "plugin_module": _module_name(impl.plugin)}
        )
        if spec.name in specs:
            raise PluginError(
                f"model name {spec.name!r} is registered by two plugins: "
                f"{specs[spec.name].plugin_name!r} and {spec.plugin_name!r}. Uninstall one, or "
                f"choose which plugins load with {PLUGINS_ENV_VAR}."
            )
        specs[spec.name] = spec

    return register


def get_model_spec(name: str, plugin_module: str | None = None) -> ModelSpec:
    """Find the spec of model ``name``.

    When no registered plugin serves it and ``plugin_module`` is given (as recorded in a logged
    model), that module is imported and registered first: this is how a logged model loads where
    its plugin travels in the model's ``code_paths`` instead of being installed.
    """
    specs = model_specs()
    if name not in specs and plugin_module:
        manager = get_plugin_manager()
        module = importlib.import_module(plugin_module)
        if not manager.is_registered(module):
            manager.register(module, name=plugin_module)
        specs = model_specs()
    if name in specs:
        return specs[name]
    failed = "".join(f"\n  plugin {e.name!r} failed to load: {e.error}" for e in _load_errors)
    raise UnknownModelError(
        f"no installed templated-llm plugin serves model {name!r}; available models: "
        f"{sorted(specs) or 'none'}{failed}"
    )
