"""The code in docs/ runs: files are written and installed, Python blocks are executed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from venvs import venv_over_this_one

DOCS = Path(__file__).parents[1] / "docs"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _blocks(page: str) -> list[tuple[str, str, str]]:
    return [(m[1], m[2].strip(), m[3]) for m in FENCE.finditer((DOCS / page).read_text())]


def _run(code: str, cwd: Path, env: dict[str, str], python: Path | str = sys.executable) -> str:
    result = subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True,
                            text=True, env={**os.environ, **env}, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _python(page: str) -> str:
    return "\n".join(code for lang, info, code in _blocks(page) if lang == "python" and not info)


@pytest.mark.parametrize(
    ("page", "printed"),
    [("quickstart.md", ["models:/", "param 'temperature'"]),
     ("serving.md", ["text_completion", "'length'", "candidates", "completion"]),
     ("attention.md", ["attention in use: sdpa", "candidates"]),
     ("security.md", ["hostile.jinja line 1", "broken-mpt/model.safetensors", "400 the request has 5",
                      "400 param 'max_tokens': at most 512"]),
     ("chat-and-streaming.md", ["<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Name three rivers. [/INST]",
                                "chunks", "'finish_reason'"]),
     ("scaling.md", ["replicas:"]),
     ("genai.md", ["chat.completion", "('render_prompts', 'CHAIN')", "response_length/mean 1.0",
                   "Q: Name three rivers.\nA:", '"name": "river-qa", "version": "1"',
                   "required fields: True stop", "Invalid type: strin"])],
)
def test_page_python_runs(page: str, printed: list[str], tmp_path: Path) -> None:
    if page == "serving.md":
        pytest.importorskip("pyspark")
    out = _run(_python(page), tmp_path, {"PYSPARK_PYTHON": sys.executable})
    for text in printed:
        assert text in out


def _edit(path: Path, assignments: str) -> None:
    """Replace the lines of ``path`` that assign the names ``assignments`` assigns."""
    lines = path.read_text().splitlines(keepends=True)
    for assignment in assignments.splitlines(keepends=True):
        name = assignment.split("=")[0].strip()
        [index] = [i for i, line in enumerate(lines) if line.startswith(f"{name} =")]
        lines[index] = assignment
    path.write_text("".join(lines))


@pytest.mark.slow
def test_writing_a_plugin_end_to_end(tmp_path: Path) -> None:
    page = "writing-a-plugin.md"
    text = (DOCS / page).read_text()
    new_plugin = "templated-llm new-plugin vicuna --repo-id lmsys/vicuna-7b-v1.5"
    install = "pip install -e 'templated-llm-vicuna[test]'"
    render = 'templated-llm render vicuna --prompt "Name three rivers." --system "Be brief."'
    assert new_plugin in text and install in text and render in text
    subprocess.run([sys.executable, "-m", "templated_llm.cli", *new_plugin.split()[1:]],
                   cwd=tmp_path, check=True)
    for lang, info, code in _blocks(page):
        target, *flags = info.split() or [""]
        kind, _, relative = target.partition("=")
        path = tmp_path / relative
        if kind == "file" and flags == ["generated"]:
            assert path.read_text() == code, f"the page shows {relative} not as new-plugin writes it"
        elif kind == "file":
            path.write_text(code)
        elif kind == "edit":
            _edit(path, code)
    # A real editable install, in a venv of its own: the entry point comes from its metadata.
    python = venv_over_this_one(tmp_path / "venv")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "-e", str(tmp_path / "templated-llm-vicuna")], check=True)

    def cli(*args: str) -> str:
        return subprocess.run([str(python), "-m", "templated_llm.cli", *args], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout

    assert "vicuna: vicuna" in cli("plugins")
    shown = [code for lang, _, code in _blocks(page) if lang == "text" and code.startswith("Be brief.")]
    assert cli("render", "vicuna", "--prompt", "Name three rivers.", "--system", "Be brief.") + "\n" == shown[0]
    tests = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "templated-llm-vicuna/tests"], cwd=tmp_path, capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout[-4000:]
    out = _run(_python(page), tmp_path, {}, python=python)
    assert out.startswith(shown[1])
    # The template is the file the editable install ships: editing it changes what the model sees.
    template = tmp_path / "templated-llm-vicuna" / "src" / "templated_llm_vicuna" / "vicuna.jinja"
    template.write_text("USER: {{ prompt }} ASSISTANT:")
    assert cli("render", "vicuna", "--prompt", "Hi") == "USER: Hi ASSISTANT:"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_pages_link_only_to_existing_docs(page: str) -> None:
    for target in re.findall(r"\]\(([\w\-]+\.md)\)", (DOCS / page).read_text()):
        assert (DOCS / target).is_file(), f"{page} links to missing {target}"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_excerpts_match_the_files_they_quote(page: str) -> None:
    for lang, info, code in _blocks(page):
        kind, _, relative = (info.split() or [""])[0].partition("=")
        if kind == "excerpt":
            assert code in (DOCS.parent / relative).read_text(), f"{page} misquotes {relative}"
