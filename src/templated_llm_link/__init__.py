"""An MLflow artifact repository that stages local files as symlinks instead of copies.

``mlflow.pyfunc`` saves a model by copying every artifact into a temporary directory and then
copies that directory into the artifact store: two full copies of multi-gigabyte weights.
Staging the snapshot through this repository puts symlinks in the temporary directory, so the
weights are read and written once, by the final upload (which follows the links).

It is a package of its own, outside ``templated_llm``: MLflow imports every registered artifact
repository when it starts, and importing ``templated_llm`` then would make an installed
templated-llm shadow the code a logged model carries in its ``code_paths``. Nothing here imports
MLflow at import time either: MLflow's start-up loads the entry point :func:`open_repository`,
and a package that imported MLflow would, when imported first, be loaded by MLflow half
initialised and its registration lost.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit
from urllib.request import url2pathname

SCHEME = "templated-llm-link"

_logger = logging.getLogger(__name__)


def link_uri(path: str | os.PathLike[str]) -> str:
    """The artifact URI under which the local directory ``path`` is staged by symlinking.

    ``templated-llm-link:`` followed by the path as a ``file:`` URI has it (``///`` and the
    absolute path, percent-encoded), so ``#``, ``?``, ``%``, ``;``, spaces and non-ASCII names
    keep their meaning through MLflow's URI parsing.
    """
    absolute = os.path.realpath(path)
    if os.name != "nt":
        # Linux and macOS read '//x' as '/x'; in the URI, '//x' would read as a host.
        absolute = "/" + absolute.lstrip("/")
    return SCHEME + ":" + Path(absolute).as_uri().removeprefix("file:")


def link_path(uri: str) -> str:
    """The local path a ``templated-llm-link`` URI names (the inverse of :func:`link_uri`).

    Accepts the URI as built and as MLflow rebuilds a root URI, without the empty authority
    (``templated-llm-link:/dir``); raises ``ValueError`` for anything else.
    """
    parts = urlsplit(uri)
    if parts.scheme != SCHEME or parts.netloc or parts.query or parts.fragment \
            or not parts.path.startswith("/"):
        raise ValueError(
            f"not a {SCHEME} URI: {uri!r}; expected {SCHEME}:///<percent-encoded absolute path>, "
            "as templated_llm_link.link_uri builds"
        )
    return decode_path(parts.path)


def decode_path(encoded: str) -> str:
    """A percent-encoded path of a ``templated-llm-link`` URI, decoded as a local path."""
    if os.name == "nt":
        return url2pathname(encoded)  # '/C:/a%20b' -> 'C:\\a b'
    return os.fsdecode(unquote_to_bytes(encoded))  # any bytes, as file names may hold


def staging_uri(path: str | os.PathLike[str]) -> str:
    """What ``log_llm`` passes MLflow for the snapshot: its link URI, or, when this repository
    is not registered with MLflow, the plain path, which MLflow copies (the reason is logged)."""
    from mlflow.store.artifact.artifact_repository_registry import (
        get_registered_artifact_repositories,
    )

    if SCHEME in get_registered_artifact_repositories():
        return link_uri(path)
    _logger.warning(
        "staging %s with plain copies (MLflow copies the weights twice): the %s artifact "
        "repository is not registered with MLflow; its entry point comes with the installed "
        "templated-llm distribution", path, SCHEME,
    )
    return str(Path(path).resolve())


def open_repository(artifact_uri: str, tracking_uri: str | None = None,
                    registry_uri: str | None = None) -> Any:
    """The ``mlflow.artifact_repository`` entry point: a :class:`SymlinkArtifactRepository`."""
    from templated_llm_link.repository import SymlinkArtifactRepository

    return SymlinkArtifactRepository(artifact_uri, tracking_uri, registry_uri)
