"""A fresh virtualenv that sees this environment's packages, to pip-install into in a test."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path


def venv_over_this_one(root: Path) -> Path:
    """Create a venv in ``root`` whose site-packages extend this interpreter's; return its python.

    Installs go into the new venv only. The line is an ``import`` so this environment's own
    ``.pth`` files (editable installs) are processed too.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site_packages = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    purelib = sysconfig.get_paths()["purelib"]
    (site_packages / "this_environment.pth").write_text(f"import site; site.addsitedir({purelib!r})\n")
    return python
