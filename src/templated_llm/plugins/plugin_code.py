"""Where a plugin module's code lives, and a digest of that code.

A logged model carries its plugin's code (a module file, or the top-level package holding the
module) and records its digest. Python imports a module name once per process, so where two
models carry different packages of one name, the second would run the first's code; the digest
says so at load.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

# What MLflow leaves out when it copies code_paths into a model, and Python writes when it
# imports: never part of the digest.
_CACHES = "__pycache__"
_COMPILED = (".pyc", ".pyo")


def package_dir(module_name: str) -> Path | None:
    """The top-level package directory of an imported module (its file, for a top-level
    module), if it lives in files that can be shipped.

    Found up from the module's own file, as many levels as its name has dots: a namespace
    package (no ``__init__.py``) has no file of its own, and may span several directories, of
    which this is the one holding the module.
    """
    file = getattr(sys.modules.get(module_name), "__file__", None)
    if not file:
        return None
    path = Path(file)
    if path.name == "__init__.py":
        path = path.parent
    return path.parents[module_name.count(".") - 1] if "." in module_name else path


def code_digest(path: Path) -> str:
    """A digest of a module file's bytes, or of a package directory's files (their paths within
    it and their bytes), compiled caches left out."""
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(path.read_bytes())
        return digest.hexdigest()[:16]
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix not in _COMPILED
                       and _CACHES not in p.relative_to(path).parts):
        for part in (file.relative_to(path).as_posix().encode(), file.read_bytes()):
            digest.update(len(part).to_bytes(8, "little"))  # length first: no two files read alike
            digest.update(part)
    return digest.hexdigest()[:16]
