"""The snapshot is staged through the templated-llm-link artifact repository from any path, and
logs with a plain copy where it cannot be."""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import (
    get_artifact_repository,
    get_registered_artifact_repositories,
)

from conftest import run_python
from templated_llm import log_llm
from templated_llm_link import SCHEME, link_uri

# Characters a URI gives a meaning to, an escape that decodes to a letter, and non-ASCII.
AWKWARD_NAMES = ["run#3", "a%41b", "with space", "what?x=1", "semi;colon", "ünïcødé-Ω", "a%2Fb"]


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


@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_a_snapshot_logs_from_any_path(tiny_snapshot, tmp_path, name):
    snapshot = Path(shutil.copytree(tiny_snapshot, tmp_path / f"dir {name}" / f"snap-{name}"))
    info = log_llm("mpt-instruct", snapshot=snapshot, name="awkward-path")
    _assert_same_files(_logged_snapshot(info), snapshot)


@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_a_template_logs_from_any_path(tiny_snapshot, tmp_path, name):
    template = tmp_path / f"dir {name}" / f"{name}.jinja"
    template.parent.mkdir()
    template.write_text("USER {{ prompt }} ANSWER")
    info = log_llm("mpt-instruct", snapshot=tiny_snapshot, template=template, name="awkward-template")
    model = mlflow.pyfunc.load_model(info.model_uri)
    assert model.unwrap_python_model().render(["Hi"]) == ["USER Hi ANSWER"]
    assert model.metadata.flavors["python_function"]["config"]["template_name"] == template.name


_NAME = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
                min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parent=_NAME, leaf=_NAME, file=_NAME)
def test_every_path_round_trips_through_mlflow(tmp_path, parent, leaf, file):
    example = Path(tempfile.mkdtemp(dir=tmp_path))  # hypothesis reuses tmp_path
    source = example / "src" / parent / leaf
    source.mkdir(parents=True)
    (source / file).write_bytes(file.encode())
    destination = example / "dst"
    destination.mkdir()
    # MLflow splits the URI into a root and a last segment, as when it saves a model.
    staged = Path(mlflow.artifacts.download_artifacts(link_uri(source), dst_path=str(destination)))
    assert staged == destination / leaf
    assert [p.name for p in staged.iterdir()] == [file]
    assert (staged / file).is_symlink() and (staged / file).read_bytes() == file.encode()


def test_the_repository_reads_the_uri_mlflow_hands_it(tmp_path):
    # MLflow rebuilds the root URI of `templated-llm-link:///a/b` as `templated-llm-link:/a`.
    folder = tmp_path / "x#y%41"
    folder.mkdir()
    (folder / "f").write_text("hi")
    for uri in (link_uri(folder), f"{SCHEME}:{link_uri(folder).removeprefix(SCHEME + '://')}"):
        assert [f.path for f in get_artifact_repository(uri).list_artifacts()] == ["f"]
    with pytest.raises(MlflowException, match="templated-llm-link:///"):
        get_artifact_repository(f"{SCHEME}://host{folder}")


def test_the_view_refuses_writes(tmp_path):
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "weights").write_bytes(b"w")
    other = tmp_path / "other"
    other.mkdir()
    (other / "new").write_bytes(b"n")
    repository = get_artifact_repository(link_uri(folder))
    writes = {
        "log_artifact": lambda: repository.log_artifact(str(other / "new")),
        "log_artifacts": lambda: repository.log_artifacts(str(other)),
        "delete_artifacts": lambda: repository.delete_artifacts(),
    }
    for name, write in writes.items():
        with pytest.raises(MlflowException, match="read-only"):
            write()
    assert sorted(p.name for p in folder.iterdir()) == ["weights"]


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


def test_without_symlinks_the_snapshot_is_copied(tiny_snapshot, tmp_path, caplog, monkeypatch):
    def no_symlinks(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    _copies_instead(tiny_snapshot, tmp_path, caplog, "cannot create symlinks", "run#1 %41")


def test_without_the_registration_the_snapshot_is_copied(tiny_snapshot, tmp_path, caplog, monkeypatch):
    monkeypatch.delitem(get_registered_artifact_repositories(), SCHEME)
    # MLflow's own local repository, which then stages it, refuses '#' in names.
    _copies_instead(tiny_snapshot, tmp_path, caplog, "not registered", "snap-1")
