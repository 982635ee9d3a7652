"""Jinja prompt templates, rendered in a sandbox where the user's text is only ever data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from templated_llm.errors import TemplateError

#: Templates shipped with templated-llm (the repository's top-level ``prompt_templates/``).
TEMPLATES_DIR = Path(__file__).resolve().parent / "prompt_templates"

_ENVIRONMENT = ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,  # prompt formats such as "### Response:\n" end in a newline
    autoescape=False,
)


def available_templates() -> list[str]:
    """File names of the templates shipped with templated-llm."""
    return sorted(p.name for p in TEMPLATES_DIR.glob("*.jinja"))


def find_template(name_or_path: str | os.PathLike[str]) -> Path:
    """Resolve a shipped template name (``mpt-instruct.jinja``) or a path to a template file."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = TEMPLATES_DIR / str(name_or_path)
    if shipped.is_file():
        return shipped
    raise TemplateError(
        f"prompt template {str(name_or_path)!r} is neither a file nor a shipped template; "
        f"shipped templates: {available_templates()}"
    )


class PromptTemplate:
    """A compiled prompt template; the user's text is passed in as the variable ``prompt``."""

    def __init__(self, source: str, name: str = "<template>") -> None:
        self.source = source
        self.name = name
        try:
            self._template = _ENVIRONMENT.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"prompt template {name} line {exc.lineno}: {exc.message}") from exc

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PromptTemplate:
        path = Path(path)
        return cls(path.read_text(encoding="utf-8"), name=str(path))

    def render(self, prompt: str, **variables: Any) -> str:
        """Render with the user's ``prompt``; ``messages`` defaults to it as the one user turn."""
        variables.setdefault("messages", [{"role": "user", "content": prompt}])
        try:
            return self._template.render(prompt=prompt, **variables)
        except jinja2.TemplateError as exc:  # undefined variables, sandbox violations
            raise TemplateError(f"prompt template {self.name} failed to render: {exc}") from exc
