"""The snapshot is staged through the templated-llm-link artifact repository, and logs with a
plain copy where it cannot be."""

from __future__ import annotations

import filecmp
import logging
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.store.artifact.artifact_repository_registry import get_registered_artifact_repositories

from conftest import run_python
from templated_llm import log_llm
from templated_llm_link import SCHEME


def _logged_snapshot(info) -> Path:
    """The snapshot directory as the store holds it, downloaded."""
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    flavor = mlflow.models.Model.load(info.model_uri).flavors["python_function"]
    return local / flavor["artifacts"]["snapshot"]["path"]


def _assert_same_files(logged: Path, snapshot: Path) -> None:
    names = sorted(p.relative_to(snapshot) for p in snapshot.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(logged) for p in logged.rglob("*") if p.is_file())
    for name in names:
        assert not (logged / name).is_symlink()
        assert filecmp.cmp(logged / name, snapshot / name, shallow=False), name


@pytest.mark.parametrize("first", ["templated_llm_link", "templated_llm_link.repository",
                                   "mlflow", "templated_llm"])
def test_registration_does_not_depend_on_import_order(first):
    code = (
        "import json, warnings\n"
        "warnings.simplefilter('error')\n"
        f"import {first}\n"
        "import mlflow\n"
        "from mlflow.store.artifact.artifact_repository_registry import"
        " get_registered_artifact_repositories\n"
        f"print(json.dumps({SCHEME!r} in get_registered_artifact_repositories()))\n"
    )
    assert run_python(code) is True


def _copies_instead(tiny_snapshot, tmp_path, caplog, reason: str, name: str) -> None:
    snapshot = Path(shutil.copytree(tiny_snapshot, tmp_path / name))
    with caplog.at_level(logging.WARNING, logger="templated_llm_link"):
        info = log_llm("mpt-instruct", snapshot=snapshot, name="copied")
    assert reason in caplog.text and "copies" in caplog.text
    _assert_same_files(_logged_snapshot(info), snapshot)


def test_without_the_registration_the_snapshot_is_copied(tiny_snapshot, tmp_path, caplog, monkeypatch):
    monkeypatch.delitem(get_registered_artifact_repositories(), SCHEME)
    # MLflow's own local repository, which then stages it, refuses '#' in names.
    _copies_instead(tiny_snapshot, tmp_path, caplog, "not registered", "snap-1")
