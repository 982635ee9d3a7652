"""The ``templated-llm-link`` artifact repository: a read-only view of a local directory whose
downloads are symlinks to its files."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repo import ArtifactRepository
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

from templated_llm_link import SCHEME, decode_path, link_path

_logger = logging.getLogger(__name__)


class SymlinkArtifactRepository(ArtifactRepository):
    """Lists a local directory and "downloads" its files as symlinks; refuses every write.

    Where symlinks cannot be made (Windows without the privilege, some file systems), each file
    is copied instead, as MLflow's own local repository would.
    """

    def __init__(self, artifact_uri: str, tracking_uri: str | None = None,
                 registry_uri: str | None = None) -> None:
        super().__init__(artifact_uri, tracking_uri, registry_uri)
        try:
            self._directory = link_path(artifact_uri)
        except ValueError as err:
            raise MlflowException.invalid_parameter_value(str(err)) from err
        # A file URI, which LocalArtifactRepository decodes exactly (a bare path it would unquote).
        self._source = LocalArtifactRepository(Path(self._directory).as_uri())
        self._stage = _staging_method(self._directory)

    def list_artifacts(self, path: str | None = None):
        return self._source.list_artifacts(path)

    def download_artifacts(self, artifact_path: str, dst_path: str | None = None) -> str:
        # MLflow hands over the last segment of the URI it split, percent-encoded as the URI is.
        return super().download_artifacts(artifact_path and decode_path(artifact_path), dst_path)

    def _download_file(self, remote_file_path: str, local_path: str) -> None:
        # The path comes from listing the directory. Not MLflow's path checks: they decode '%'
        # escapes, refuse '#', and refuse the links of a Hugging Face cache snapshot.
        self._stage(os.path.realpath(os.path.join(self._directory, remote_file_path)), local_path)

    def log_artifact(self, local_file: str, artifact_path: str | None = None) -> None:
        self._refuse("log_artifact")

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self._refuse("log_artifacts")

    def delete_artifacts(self, artifact_path: str | None = None) -> None:
        self._refuse("delete_artifacts")

    def _refuse(self, operation: str) -> None:
        raise MlflowException(
            f"{operation}: {self.artifact_uri} is a read-only view of a local directory ({SCHEME} "
            "stages a snapshot for logging); write to the model's artifact store instead"
        )


def _staging_method(directory: str) -> Callable[[str, str], object]:
    """``os.symlink`` where MLflow's staging directory (the temporary one) takes symlinks,
    else a plain copy, with the reason logged."""
    with tempfile.TemporaryDirectory() as probe:
        try:
            os.symlink(probe, os.path.join(probe, "link"))
        except OSError as err:
            _logger.warning("staging %s with plain copies (MLflow copies the weights twice): this "
                            "system cannot create symlinks in %s (%s)", directory,
                            tempfile.gettempdir(), err)
            return shutil.copyfile
    return os.symlink
