"""The small snapshots: deterministic, shaped like their families, and buildable from the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from templated_llm.devtools.tiny import END_OF_TEXT, ZEPHYR_CHAT_TEMPLATE, build_tiny_model, build_tiny_mpt


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


@pytest.mark.parametrize(
    ("architecture", "model_type", "bos_added", "pad"),
    [("llama", "llama", True, None), ("mistral", "mistral", True, None), ("gpt_neox", "gpt_neox", False, None),
     # Qwen's checkpoints pad with their end-of-text token.
     ("qwen2", "qwen2", False, END_OF_TEXT), ("qwen3", "qwen3", False, END_OF_TEXT)],
)
def test_other_architectures_follow_their_familys_tokenizer(tiny_model, architecture, model_type, bos_added,
                                                            pad) -> None:
    snapshot = tiny_model(architecture)
    assert json.loads((snapshot / "config.json").read_text())["model_type"] == model_type
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    assert tokenizer.pad_token == pad
    ids = tokenizer("[INST] Hi [/INST]").input_ids
    assert (ids[0] == tokenizer.bos_token_id) is bos_added
    assert tokenizer.decode(ids, skip_special_tokens=True) == "[INST] Hi [/INST]"


def test_a_chat_template_and_special_tokens_travel_with_the_tokenizer(tmp_path: Path) -> None:
    snapshot = build_tiny_model("gpt_neox", tmp_path / "m", chat_template=ZEPHYR_CHAT_TEMPLATE,
                                extra_special_tokens=["### End"])
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    assert tokenizer.chat_template == ZEPHYR_CHAT_TEMPLATE
    assert len(tokenizer("### End").input_ids) == 1


def test_an_unknown_architecture_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'llama'"):
        build_tiny_model("t5", tmp_path)


def test_a_sliding_window_goes_where_the_family_puts_it(tiny_model, tmp_path: Path) -> None:
    mistral = json.loads((tiny_model("mistral", sliding_window=6) / "config.json").read_text())
    assert mistral["sliding_window"] == 6
    qwen = json.loads((tiny_model("qwen2", sliding_window=6, window_layers=1) / "config.json").read_text())
    assert (qwen["sliding_window"], qwen["layer_types"]) == (6, ["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match="'llama' has no sliding window"):
        build_tiny_model("llama", tmp_path, sliding_window=6)
