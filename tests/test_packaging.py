"""The built wheel ships the prompt templates, the console script and the artifact repository."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_wheel_ships_templates_and_entry_points(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    [wheel] = tmp_path.glob("templated_llm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {p.name for p in (ROOT / "prompt_templates").glob("*.jinja")}
    assert shipped and all(f"templated_llm/prompt_templates/{n}" in names for n in shipped)
    # The files `templated-llm new-plugin` writes from.
    kit = {p.name for p in (ROOT / "src" / "templated_llm" / "devtools" / "plugin_kit").iterdir()}
    assert kit and all(f"templated_llm/devtools/plugin_kit/{n}" in names for n in kit)
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))
    ).decode()
    assert "templated-llm = templated_llm.cli:main" in entry_points
    assert "templated-llm-link = templated_llm_link:open_repository" in entry_points
    assert {"templated_llm_link/__init__.py", "templated_llm_link/repository.py"} <= set(names)
