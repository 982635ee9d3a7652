"""The ``templated-llm-link`` artifact repository."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

from templated_llm_link import decode_path, link_path

_logger = logging.getLogger(__name__)


class SymlinkArtifactRepository(LocalArtifactRepository):
    """Read-only view of a local directory whose downloads are symlinks to the source files.

    Where symlinks cannot be made (Windows without the privilege, some file systems), each file
    is copied instead, as MLflow's own local repository would.
    """

    def __init__(self, artifact_uri: str, tracking_uri: str | None = None,
                 registry_uri: str | None = None) -> None:
        try:
            directory = link_path(artifact_uri)
        except ValueError as err:
            raise MlflowException.invalid_parameter_value(str(err)) from err
        # A file URI, which LocalArtifactRepository decodes exactly (a bare path it would unquote).
        super().__init__(Path(directory).as_uri(), tracking_uri, registry_uri)
        self._stage = _staging_method(directory)

    def download_artifacts(self, artifact_path: str, dst_path: str | None = None) -> str:
        # MLflow hands over the last segment of the URI it split, percent-encoded as the URI is.
        return super().download_artifacts(artifact_path and decode_path(artifact_path), dst_path)

    def _download_file(self, remote_file_path: str, local_path: str) -> None:
        # The path comes from listing the directory. Not MLflow's path checks: they decode '%'
        # escapes, refuse '#', and refuse the links of a Hugging Face cache snapshot.
        self._stage(os.path.realpath(os.path.join(self.artifact_dir, remote_file_path)), local_path)


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
