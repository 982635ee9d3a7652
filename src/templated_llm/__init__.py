"""templated-llm: any Hugging Face causal LM as a production MLflow model, through plugins."""

import importlib

from templated_llm.errors import (
    AttentionUnavailableError,
    ConfigError,
    PluginError,
    PluginLoadWarning,
    RemoteCodeError,
    RemoteCodeWarning,
    SnapshotError,
    TaskError,
    TemplatedLLMError,
    TemplateError,
    TemplateSecurityError,
    UnknownModelError,
)
from templated_llm.plugins.hookspecs import hookimpl
from templated_llm.spec import ModelSpec

__version__ = "0.1.0"

__all__ = [
    "AttentionUnavailableError",
    "ConfigError",
    "ModelSpec",
    "PluginError",
    "PluginLoadWarning",
    "RemoteCodeError",
    "RemoteCodeWarning",
    "SnapshotError",
    "TaskError",
    "TemplateError",
    "TemplateSecurityError",
    "TemplatedLLM",
    "TemplatedLLMError",
    "UnknownModelError",
    "build_tiny_mpt",
    "hookimpl",
    "log_llm",
    "model_specs",
    "register_plugin",
]


# Heavy imports (mlflow, torch) wait until used, so plugins can import hookimpl cheaply.
_LAZY = {
    "log_llm": "templated_llm.model_logging.log",
    "TemplatedLLM": "templated_llm.runtime.pyfunc",
    "register_plugin": "templated_llm.plugins.manager",
    "model_specs": "templated_llm.plugins.manager",
    "build_tiny_mpt": "templated_llm.devtools.tiny",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'templated_llm' has no attribute {name!r}")
