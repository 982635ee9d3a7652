"""The ``templated-llm-link`` artifact repository."""

from __future__ import annotations

import os

from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

from templated_llm_link import SCHEME


class SymlinkArtifactRepository(LocalArtifactRepository):
    """Read-only view of a local directory whose downloads are symlinks to the source files."""

    def __init__(self, artifact_uri: str, *args, **kwargs) -> None:
        super().__init__("file://" + artifact_uri.removeprefix(f"{SCHEME}://"), *args, **kwargs)

    def _download_file(self, remote_file_path: str, local_path: str) -> None:
        source = os.path.realpath(os.path.join(self.artifact_dir, os.path.normpath(remote_file_path)))
        os.symlink(source, local_path)
