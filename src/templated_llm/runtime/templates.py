"""Jinja prompt templates, rendered in a sandbox where the user's text is only ever data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from templated_llm.errors import TemplateError, TemplateSecurityError

#: Templates shipped with templated-llm (the repository's top-level ``prompt_templates/``).
# Shipped at the package root: plugins name them in their specs.
TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "prompt_templates"

_ENVIRONMENT = ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,  # prompt formats such as "### Response:\n" end in a newline
    autoescape=False,
)


def available_templates() -> list[str]:
    """File names of the templates shipped with templated-llm."""
    return sorted(p.name for p in TEMPLATES_DIR.glob("*.jinja"))


def find_template(name_or_path: str | os.PathLike[str], *, shipped_first: bool = False) -> Path:
    """Resolve a shipped template name (``mpt-instruct.jinja``) or a path to a template file.

    A bare name that is both a shipped template and a different file in the working directory
    is the shipped one where ``shipped_first`` (a plugin naming its template: a draft beside the
    user's work must not replace it), else refused as ambiguous (a caller's ``template=``)."""
    path = Path(name_or_path).expanduser()
    bare = str(name_or_path) == path.name
    shipped = TEMPLATES_DIR / str(name_or_path)
    if bare and isinstance(name_or_path, os.PathLike) and path.is_file():
        return path  # a Path names a file: Path('./x.jinja') is Path('x.jinja')
    if bare and shipped.is_file():
        if shipped_first or not path.is_file() or path.read_bytes() == shipped.read_bytes():
            return shipped
        raise TemplateError(
            f"prompt template {path.name!r} is both a shipped template and a different file in the "
            f"working directory ({path.resolve()}); pass './{path.name}' or Path('{path.name}') for the file, "
            "or rename it")
    if path.is_file():
        return path
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
            tree = _ENVIRONMENT.parse(source)
            _check_sandbox(tree, name)
            self._template = _ENVIRONMENT.from_string(tree)  # compiles the tree parsed once
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


# Tags that read other template files: a prompt template is one self-contained file.
_FILE_TAGS = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from ... import",
              nodes.Extends: "extends"}


def _check_sandbox(tree: nodes.Template, name: str) -> None:
    """Reject, before any rendering, what the sandbox would only refuse on the branch reaching it.

    The sandbox blocks ``_private`` and ``__dunder__`` attributes and file access at render time;
    checking the parsed template finds them in every branch, including ones a sample never takes.
    """
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, *_FILE_TAGS)):
        if isinstance(node, tuple(_FILE_TAGS)):
            reached = f"the {_FILE_TAGS[type(node)]!r} tag (templates may not read other files)"
        elif isinstance(node, nodes.Getattr):
            reached = f"the attribute {node.attr!r}" if node.attr.startswith("_") else None
        else:
            key = node.arg.value if isinstance(node.arg, nodes.Const) else None
            reached = f"the item {key!r}" if isinstance(key, str) and key.startswith("_") else None
        if reached:
            raise TemplateSecurityError(
                f"prompt template {name} line {node.lineno} reaches for {reached}; prompt "
                "templates render in a sandbox without private attributes, imports or file access"
            )


# Digits only: a template may change the case of the user's text or trim it, and still show it.
_USER_TEXT = "4729105836"


def validate_template(path: str | os.PathLike[str], sample: dict[str, Any], name: str | None = None
                      ) -> PromptTemplate:
    """Load a template and render it once with ``sample`` variables, so it fails at log time.

    Raises :class:`TemplateSecurityError` for a sandbox violation and :class:`TemplateError`,
    naming the template (``name``, else the file) and line, for a syntax error or an undefined
    variable.
    """
    template = PromptTemplate(Path(path).read_text(encoding="utf-8"), name=name or str(path))
    try:
        template.render(**sample)
        shown = _USER_TEXT in template.render(**{**sample, "prompt": _USER_TEXT})
    except TemplateError as exc:
        if isinstance(exc.__cause__, SecurityError):
            raise TemplateSecurityError(
                f"prompt template {template.name} breaks the sandbox: {exc.__cause__}"
            ) from exc.__cause__
        raise
    if not shown:
        # Every request would render the same text: the user's input silently dropped.
        raise TemplateError(
            f"prompt template {template.name} never shows the user's text: it must use the "
            "variable {{ prompt }} (or {{ messages }} for a chat template); single braces such "
            "as {question} are plain text in Jinja")
    return template
