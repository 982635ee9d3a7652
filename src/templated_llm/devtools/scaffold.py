"""``templated-llm new-plugin``: writes a working plugin distribution to start from."""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path
from string import Template

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from templated_llm.devtools.tiny import ARCHITECTURES
from templated_llm.errors import TemplatedLLMError
from templated_llm.plugins.manager import ENTRY_POINT_GROUP, model_specs
from templated_llm.runtime.templates import PromptTemplate

_KIT = Path(__file__).parent / "plugin_kit"
_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
# What the generated test renders, and so what its EXPECTED holds.
_SAMPLE = {"prompt": "Name three rivers.", "system": "Be brief."}


def _check_unused(name: str) -> None:
    """Refuse a name an installed plugin already has: installed, the new one would displace it
    (or be skipped) with only a warning."""
    taken = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if name in taken:
        raise TemplatedLLMError(f"an installed plugin already has the name {name!r} ({taken[name]}); "
                                "choose another name")
    if name in model_specs():
        raise TemplatedLLMError(f"model {name!r} is already served by an installed plugin; choose another name")


def write_plugin(
    name: str,
    directory: str | os.PathLike[str] | None = None,
    *,
    repo_id: str | None = None,
    architecture: str = "llama",
) -> Path:
    """Write the distribution ``templated-llm-NAME`` (into ``directory``, default
    ``./templated-llm-NAME``) and return its path.

    It holds a pyproject with the entry point, the hook implementations, a Jinja template and a
    test that logs, renders, predicts and streams on a small random ``architecture`` model.
    """
    if not _NAME.fullmatch(name):
        raise TemplatedLLMError(
            f"plugin name {name!r} must be lowercase letters and digits in words joined by "
            "hyphens, starting with a letter (e.g. 'vicuna' or 'llama3-instruct')"
        )
    if architecture not in ARCHITECTURES:
        raise TemplatedLLMError(f"architecture {architecture!r} is not one of {list(ARCHITECTURES)}")
    _check_unused(name)
    if repo_id is not None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise TemplatedLLMError(f"--repo-id {repo_id!r} is not a Hugging Face repo id "
                                    f"('namespace/name'): {exc}") from None
    package = "templated_llm_" + name.replace("-", "_")
    distribution = f"templated-llm-{name}"
    root = Path(directory if directory is not None else distribution)
    if root.exists() and any(root.iterdir()):
        raise TemplatedLLMError(f"{str(root)!r} exists and is not empty; choose another directory")
    values = {"name": name, "package": package, "distribution": distribution,
              "test_module": "test_" + name.replace("-", "_"),
              "repo_id": repo_id or f"your-org/{name}", "architecture": architecture}
    template = Template((_KIT / "template.jinja.tmpl").read_text()).substitute(values)
    prompt = PromptTemplate(template, name=f"{name}.jinja").render(
        _SAMPLE["prompt"], system=_SAMPLE["system"]
    )
    files = {
        "pyproject.toml": "pyproject.toml.tmpl",
        "README.md": "README.md.tmpl",
        f"src/{package}/__init__.py": "__init__.py.tmpl",
        f"tests/{values['test_module']}.py": "test_plugin.py.tmpl",
    }
    for target, source in files.items():
        text = Template((_KIT / source).read_text()).substitute(values, expected=repr(prompt))
        _write(root / target, text)
    _write(root / "src" / package / f"{name}.jinja", template)
    return root


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
