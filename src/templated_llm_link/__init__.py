"""An MLflow artifact repository that stages local files as symlinks instead of copies.

``mlflow.pyfunc`` saves a model by copying every artifact into a temporary directory and then
copies that directory into the artifact store: two full copies of multi-gigabyte weights.
Staging the snapshot through this repository puts symlinks in the temporary directory, so the
weights are read and written once, by the final upload (which follows the links).

It is a package of its own, outside ``templated_llm``: MLflow imports every registered artifact
repository when it starts, and importing ``templated_llm`` then would make an installed
templated-llm shadow the code a logged model carries in its ``code_paths``.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

SCHEME = "templated-llm-link"


def link_uri(path: str | os.PathLike[str]) -> str:
    """The artifact URI under which ``path`` is staged by symlinking."""
    return f"{SCHEME}://{Path(path).resolve().as_posix()}"


class SymlinkArtifactRepository(LocalArtifactRepository):
    """Read-only view of a local directory whose downloads are symlinks to the source files."""

    def __init__(self, artifact_uri: str, *args, **kwargs) -> None:
        super().__init__("file://" + artifact_uri.removeprefix(f"{SCHEME}://"), *args, **kwargs)

    def _download_file(self, remote_file_path: str, local_path: str) -> None:
        source = os.path.realpath(os.path.join(self.artifact_dir, os.path.normpath(remote_file_path)))
        os.symlink(source, local_path)
