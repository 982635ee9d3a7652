"""The package reads like the architecture: each module imports only what comes before it."""

from __future__ import annotations

import ast
from pathlib import Path

import templated_llm

PACKAGE = Path(templated_llm.__file__).parent
# The pipeline and the parts around it, in order: a module may import only modules listed before
# it, so no stage imports a later one, and nothing imports the composition above it.
ORDER = [
    "errors", "spec", "host_memory",
    "plugins.hookspecs", "plugins.attention",
    "runtime.device", "runtime.templates", "runtime.inputs", "runtime.structured", "runtime.params",
    "runtime.prompts",
    "runtime.tokens", "runtime.completions", "runtime.streams", "runtime.tasks", "runtime.generation", "runtime.batching",
    "runtime.tracing", "runtime.packed_linear",
    "engine.config", "engine.stats", "engine.sampling", "engine.sequence", "engine.cache",
    "engine.attention", "engine.adapters", "engine.scheduler",
    "model_logging.config", "model_logging.prompt_registry", "model_logging.snapshot", "runtime.memory",
    "plugins.hf_defaults", "plugins.plugin_code", "plugins.manager",
    "runtime.loading", "runtime.pyfunc",
    "model_logging.log", "model_logging.model_code", "evaluation",
    "serving.config", "serving.openai_requests", "serving.openai_responses", "serving.backend",
    "serving.generations", "serving.failures", "serving.metrics", "serving.gate", "serving.mlflow_routes",
    "serving.app", "serving.allocator",
    "serving.server",
    "devtools.tiny", "devtools.scaffold", "devtools.demo",
    "cli", "__init__",
]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] != "__init__" or len(parts) == 1:
            modules[".".join(parts)] = path
    return modules


def _imported(path: Path) -> set[str]:
    """The package's modules that ``path`` imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("templated_llm"):
            base = node.module.removeprefix("templated_llm").lstrip(".")
            for alias in node.names:
                name = f"{base}.{alias.name}".lstrip(".")
                found.add(name if name in ORDER else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("templated_llm.") for a in node.names
                      if a.name.startswith("templated_llm.")}
    return found - {""}


def test_every_module_has_its_place_in_the_order() -> None:
    unplaced = sorted(set(_modules()) - set(ORDER))
    assert not unplaced, f"add {unplaced} to ORDER, after everything they import"


def test_no_module_imports_one_that_comes_after_it() -> None:
    backwards = {
        name: sorted(m for m in _imported(path) if m in ORDER and ORDER.index(m) >= ORDER.index(name))
        for name, path in _modules().items() if name in ORDER
    }
    assert not {name: later for name, later in backwards.items() if later}


def test_every_subpackage_says_what_it_is() -> None:
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, f"{init.parent.name}/__init__.py needs a docstring"
