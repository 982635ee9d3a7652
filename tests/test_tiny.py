"""The small MPT snapshot: deterministic, MPT-shaped, and buildable from the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer

from templated_llm.tiny import END_OF_TEXT, build_tiny_mpt


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tiny_snapshot: Path, tmp_path: Path) -> None:
    again = build_tiny_mpt(tmp_path / "again", seed=0)
    assert _files(again) == _files(tiny_snapshot)
    other = build_tiny_mpt(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_it_looks_like_an_mpt_instruct_snapshot(tiny_snapshot: Path) -> None:
    config = json.loads((tiny_snapshot / "config.json").read_text())
    assert config["model_type"] == "mpt"
    assert config["use_cache"] is False  # as mosaicml ships it; generation must turn it on
    tokenizer = AutoTokenizer.from_pretrained(tiny_snapshot)
    assert tokenizer.pad_token is None
    assert tokenizer.eos_token == tokenizer.bos_token == END_OF_TEXT
    text = "### Instruction:\nName three rivers.\n### Response:\n"
    assert tokenizer.decode(tokenizer(text).input_ids) == text  # byte-level: lossless


def test_the_cli_builds_a_snapshot(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "templated_llm.cli", "build-tiny-model", str(tmp_path / "m"),
         "--d-model", "32", "--n-layers", "1", "--n-heads", "2"],
        capture_output=True, text=True, check=True,
    )
    assert result.stdout.strip() == str(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["d_model"] == 32
