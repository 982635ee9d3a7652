"""templated-llm: any Hugging Face causal LM as a production MLflow model, through plugins."""

from templated_llm.errors import (
    AttentionUnavailableError,
    PluginError,
    RemoteCodeError,
    SnapshotError,
    TemplatedLLMError,
    TemplateError,
    TemplateSecurityError,
    UnknownModelError,
)
from templated_llm.hookspecs import hookimpl
from templated_llm.spec import ModelSpec

__version__ = "0.1.0"

__all__ = [
    "AttentionUnavailableError",
    "ModelSpec",
    "PluginError",
    "RemoteCodeError",
    "SnapshotError",
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


def __getattr__(name: str):
    # Heavy imports (mlflow, torch) wait until used, so plugins can import hookimpl cheaply.
    if name == "log_llm":
        from templated_llm.log import log_llm

        return log_llm
    if name == "TemplatedLLM":
        from templated_llm.pyfunc import TemplatedLLM

        return TemplatedLLM
    if name in ("register_plugin", "model_specs"):
        from templated_llm import plugin_manager

        return getattr(plugin_manager, name)
    if name == "build_tiny_mpt":
        from templated_llm.tiny import build_tiny_mpt

        return build_tiny_mpt
    raise AttributeError(f"module 'templated_llm' has no attribute {name!r}")
