"""The code in docs/ runs: files are written and installed, Python blocks are executed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).parents[1] / "docs"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _blocks(page: str) -> list[tuple[str, str, str]]:
    return [(m[1], m[2].strip(), m[3]) for m in FENCE.finditer((DOCS / page).read_text())]


def _run(code: str, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                            text=True, env={**os.environ, **env}, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _python(page: str) -> str:
    return "\n".join(code for lang, info, code in _blocks(page) if lang == "python" and not info)


@pytest.mark.parametrize(
    ("page", "printed"),
    [("quickstart.md", ["models:/", "param 'temperature'"]),
     ("serving.md", ["candidates", "completion"]),
     ("scaling.md", ["replicas:"])],
)
def test_page_python_runs(page: str, printed: list[str], tmp_path: Path) -> None:
    if page == "serving.md":
        pytest.importorskip("pyspark")
    out = _run(_python(page), tmp_path, {"PYSPARK_PYTHON": sys.executable})
    for text in printed:
        assert text in out


def test_writing_a_plugin_worked_example(tmp_path: Path) -> None:
    for lang, info, code in _blocks("writing-a-plugin.md"):
        if info.startswith("file="):
            path = tmp_path / info.removeprefix("file=")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(code)
    site = tmp_path / "site"
    # A real install: the entry point comes from the distribution's metadata.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(tmp_path / "templated-llm-dolly")],
        check=True,
    )
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    listed = subprocess.run([sys.executable, "-m", "templated_llm.cli", "plugins"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, **env}, check=True)
    assert "dolly-v2: dolly-v2" in listed.stdout
    out = _run(_python("writing-a-plugin.md"), tmp_path, env)
    assert "### Instruction:\nName three rivers.\n\n### Response:\n" in out


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_pages_link_only_to_existing_docs(page: str) -> None:
    for target in re.findall(r"\]\(([\w\-]+\.md)\)", (DOCS / page).read_text()):
        assert (DOCS / target).is_file(), f"{page} links to missing {target}"
