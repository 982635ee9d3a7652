"""Snapshot checks say what a file is and what to do, and keep the error that caught it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from templated_llm import SnapshotError, log_llm


@pytest.fixture
def snapshot(tiny_snapshot: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_snapshot, tmp_path / "snapshot"))


def _as_bin(snapshot: Path, **save_options) -> None:
    weights = load_file(snapshot / "model.safetensors")
    (snapshot / "model.safetensors").unlink()
    torch.save(weights, snapshot / "pytorch_model.bin", **save_options)


def test_a_legacy_bin_is_named_and_the_conversion_given_works(snapshot):
    _as_bin(snapshot, _use_new_zipfile_serialization=False)
    with pytest.raises(SnapshotError) as caught:
        log_llm("mpt-instruct", snapshot=snapshot)
    message = str(caught.value)
    assert "pytorch_model.bin" in message and "legacy" in message and "not a zip archive" in message
    assert "mmap" in str(caught.value.__cause__)  # torch's own error, kept
    # The message's snippet converts the snapshot; then it logs.
    [snippet] = re.findall(r"`(from transformers import .*?)`", message)
    subprocess.run([sys.executable, "-c", snippet], check=True, capture_output=True)
    info = log_llm("mpt-instruct", snapshot=snapshot, name="converted")
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    assert list(local.glob("artifacts/*/model.safetensors"))


def _bad_json(snapshot: Path) -> None:
    (snapshot / "config.json").write_text("{not json")


def _bad_tokenizer(snapshot: Path) -> None:
    (snapshot / "tokenizer.json").write_text('{"model": 3}')


def _truncated_safetensors(snapshot: Path) -> None:
    weights = snapshot / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


class _Code:
    pass


def _pickled_code(snapshot: Path) -> None:
    (snapshot / "model.safetensors").unlink()
    torch.save({"weight": torch.ones(1), "code": _Code()}, snapshot / "pytorch_model.bin")


@pytest.mark.parametrize("breakage", [_bad_json, _bad_tokenizer, _truncated_safetensors, _pickled_code])
def test_every_check_keeps_the_error_that_caught_the_file(snapshot, breakage):
    breakage(snapshot)
    with pytest.raises(SnapshotError) as caught:
        log_llm("mpt-instruct", snapshot=snapshot)
    assert caught.value.__cause__ is not None
