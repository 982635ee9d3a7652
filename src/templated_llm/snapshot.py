"""Finds the model snapshot to log: a local directory, or a download from the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

from templated_llm.errors import SnapshotError
from templated_llm.spec import ModelSpec


def resolve_snapshot(spec: ModelSpec, snapshot: str | os.PathLike[str] | None) -> Path:
    """Return a local snapshot directory for ``spec``.

    A given directory is used as is (never copied here); ``None`` downloads the spec's
    repository with ``huggingface_hub`` (progress bars on, the Hub cache reused).
    """
    if snapshot is None:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=spec.repo_id, revision=spec.revision))
    path = Path(snapshot).expanduser()
    if not path.is_dir():
        raise SnapshotError(
            f"snapshot {str(snapshot)!r} is not a directory; pass a local snapshot directory, or "
            f"snapshot=None to download {spec.repo_id!r} from the Hugging Face Hub"
        )
    if not (path / "config.json").is_file():
        raise SnapshotError(
            f"snapshot {str(path)!r} has no config.json; it does not look like a Hugging Face "
            "model directory"
        )
    return path
