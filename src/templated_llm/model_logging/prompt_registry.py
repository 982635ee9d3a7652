"""Prompt templates from MLflow's prompt registry: ``prompts:/name/version`` or ``prompts:/name@alias``
resolved to one version, its text written to a file that is checked and logged like any template
file (so serving needs no registry), and the version recorded with the model."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import PromptVersion

from templated_llm.errors import TemplateError

PROMPT_URI_PREFIX = "prompts:/"


def is_prompt_uri(template: object) -> bool:
    return isinstance(template, str) and template.startswith(PROMPT_URI_PREFIX)


@dataclass(frozen=True)
class TemplateSource:
    """The template file a model is logged with: its name and version, and for a prompt
    registry version its own URI (``prompts:/name/version``, whatever alias named it)."""

    path: Path
    name: str
    version: str
    uri: str | None = None


def _check_jinja_support() -> None:
    # MLflow renders a prompt with Jinja control flow ({% ... %}) only where PromptVersion.format
    # knows its sandbox; before that, such a prompt's text is a template MLflow cannot use.
    if "use_jinja_sandbox" not in inspect.signature(PromptVersion.format).parameters:
        raise TemplateError(
            f"the installed MLflow ({mlflow.__version__}) cannot store Jinja prompts (its "
            "PromptVersion.format has no Jinja sandbox): upgrade MLflow to use prompt registry "
            "templates, or pass a template file"
        )


def fetch_prompt_template(uri: str, directory: Path) -> TemplateSource:
    """Load ``uri`` from the prompt registry and write its text to a file in ``directory``.

    Raises :class:`TemplateError` for a prompt that does not exist, a chat prompt (a list of
    messages rather than one text), or an MLflow without Jinja prompts.
    """
    _check_jinja_support()
    try:
        # No linking here: log_llm links the version to the model it logs.
        prompt = mlflow.genai.load_prompt(uri, link_to_model=False)
    except Exception as exc:  # MlflowException for a missing name, version or alias
        raise TemplateError(f"prompt template {uri!r} could not be loaded from the prompt registry: {exc}") from exc
    if not prompt.is_text_prompt:
        raise TemplateError(
            f"prompt template {uri!r} (version {prompt.version}) is a chat prompt (a list of "
            "messages); a model's template is one text rendering the request, with {{ prompt }} "
            "or {{ messages }}: register a text prompt"
        )
    safe_name = re.sub(r"[^\w.-]", "_", prompt.name)
    path = directory / f"{safe_name}-v{prompt.version}.jinja"
    path.write_text(prompt.template, encoding="utf-8")
    return TemplateSource(path, prompt.name, str(prompt.version), f"{PROMPT_URI_PREFIX}{prompt.name}/{prompt.version}")
