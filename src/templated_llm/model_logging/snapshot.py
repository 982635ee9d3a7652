"""The model snapshot to log: found (a local directory, or a download from the Hugging Face
Hub), then checked: config, tokenizer files, weights, and its need for remote code.

The checks read files only; no model code runs and no weights are loaded into memory
(safetensors headers are read through a memory map, ``.bin`` files through torch's
weights-only loader, which refuses pickled code).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from templated_llm.errors import RemoteCodeError, SnapshotError
from templated_llm.spec import ModelSpec

# Beside config.json, which must be there: checked when present.
_OPTIONAL_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                        "added_tokens.json", "vocab.json")
# Any one of these makes a tokenizer transformers can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json",
                    "vocab.txt", "tiktoken.model")
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"


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


def check_snapshot(snapshot: Path, spec: ModelSpec) -> None:
    """Raise :class:`SnapshotError`, naming the file, if ``snapshot`` cannot be loaded as is
    (by ``spec``'s plugin: a model of a type it loads)."""
    config = _read_json(snapshot / "config.json")
    for name in _OPTIONAL_JSON_FILES:
        if (snapshot / name).exists():
            _read_json(snapshot / name)
    model_type = config.get("model_type")
    if spec.model_types and model_type not in spec.model_types:
        raise SnapshotError(
            f"snapshot {snapshot} holds a model of type {model_type!r} (config.json); model "
            f"{spec.name!r} (plugin {spec.plugin_name!r}) loads {list(spec.model_types)}. Log it "
            "with a plugin for its type, or the generic 'hf-chat' if it has a chat template")
    _check_tokenizer(snapshot)
    _check_weights(snapshot)


def remote_code_reason(snapshot: Path) -> str:
    """Why transformers' ``Auto*`` classes would run Python code from ``snapshot`` ('' if not).

    Mirrors transformers' rule: code named in an ``auto_map`` runs when ``trust_remote_code``
    is on; with it off, loading fails unless transformers has a native class for the model.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.models.auto.tokenization_auto import (
        TOKENIZER_MAPPING_NAMES,
        tokenizer_class_from_name,
    )

    config = _read_json(snapshot / "config.json")
    model_type = config.get("model_type")
    auto_map = _auto_map(config, "config.json")
    for auto_class, native in (("AutoConfig", CONFIG_MAPPING_NAMES),
                               ("AutoModelForCausalLM", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)):
        if auto_class in auto_map and model_type not in native:
            return (f"config.json maps {auto_class} to {auto_map[auto_class]!r}, code shipped in the "
                    f"snapshot, and transformers has no native class for model_type {model_type!r}")
    tokenizer_path = snapshot / "tokenizer_config.json"
    tokenizer = _read_json(tokenizer_path) if tokenizer_path.exists() else {}
    tokenizer_map = _auto_map(tokenizer, "tokenizer_config.json").get("AutoTokenizer") or auto_map.get(
        "AutoTokenizer"
    )
    tokenizer_class = str(tokenizer.get("tokenizer_class") or "").removesuffix("Fast")
    native_tokenizer = model_type in TOKENIZER_MAPPING_NAMES or any(
        tokenizer_class_from_name(name) is not None
        for name in (tokenizer_class, tokenizer_class + "Fast") if tokenizer_class
    )
    if tokenizer_map and not native_tokenizer:
        return (f"tokenizer_config.json maps AutoTokenizer to {tokenizer_map!r}, code shipped in "
                "the snapshot, and transformers has no native tokenizer for it")
    return ""


def _auto_map(config: dict[str, Any], name: str) -> dict[str, Any]:
    auto_map = config.get("auto_map") or {}
    if not isinstance(auto_map, dict):
        raise SnapshotError(f"{name}: 'auto_map' must map Auto classes to code; received {auto_map!r}")
    return auto_map


def check_remote_code(reason: str, trust_remote_code: bool) -> None:
    """Refuse a snapshot that needs remote code unless the caller opted in."""
    if reason and not trust_remote_code:
        raise RemoteCodeError(
            f"loading this snapshot would run Python code shipped with it: {reason}. Read that "
            "code, and if you trust it, pass trust_remote_code=True to log_llm; the choice is "
            "recorded in the logged model and warned about whenever it loads."
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SnapshotError(f"{path} is missing")
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise SnapshotError(f"{path} must hold a JSON object; it holds {type(value).__name__}")
    return value


def _check_tokenizer(snapshot: Path) -> None:
    present = [name for name in _TOKENIZER_FILES if (snapshot / name).is_file()]
    if not present:
        raise SnapshotError(
            f"snapshot {snapshot} has no tokenizer files; expected one of {list(_TOKENIZER_FILES)}"
        )
    for name in present:
        path = snapshot / name
        if path.stat().st_size == 0:
            raise SnapshotError(f"tokenizer file {path} is empty")
    if "tokenizer.json" in present:
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(snapshot / "tokenizer.json"))
        except Exception as exc:  # the Rust parser raises its own Exception type
            raise SnapshotError(
                f"tokenizer file {snapshot / 'tokenizer.json'} does not load: {exc}"
            ) from exc
    if present == ["vocab.json"] and not (snapshot / "merges.txt").is_file():
        raise SnapshotError(f"snapshot {snapshot} has vocab.json but no merges.txt for its BPE tokenizer")


def _weight_files(snapshot: Path, single: str, index_name: str) -> list[Path]:
    if (snapshot / single).is_file():
        return [snapshot / single]
    index = snapshot / index_name
    if not index.exists():
        return []
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SnapshotError(f"{index} has no 'weight_map' of tensor names to files")
    files = [snapshot / name for name in sorted(set(map(str, weight_map.values())))]
    for path in files:
        if not path.is_file():
            raise SnapshotError(f"weights file {path}, listed in {index.name}, is missing")
    return files


def weight_files(snapshot: Path) -> list[Path]:
    """The files transformers loads the weights from, by its rule: ``model.safetensors``, else
    the shards its index lists (safetensors preferred), else ``pytorch_model.bin``, else the
    ``.bin`` shards of its index; none when there are none of these (other files are never read)."""
    return (_weight_files(snapshot, "model.safetensors", _SAFETENSORS_INDEX)
            or _weight_files(snapshot, "pytorch_model.bin", _BIN_INDEX))


def _check_weights(snapshot: Path) -> None:
    files = weight_files(snapshot)
    if not files:
        others = sorted(p.name for p in snapshot.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        raise SnapshotError(
            f"snapshot {snapshot} has no weights transformers reads; expected model.safetensors "
            f"(preferred), shards listed in {_SAFETENSORS_INDEX}, pytorch_model.bin or shards "
            f"listed in {_BIN_INDEX}" + (f"; found only {others}" if others else "")
        )
    for path in files:
        if path.suffix == ".safetensors":
            _check_safetensors(path)
        else:
            _check_bin(path)


def _check_safetensors(path: Path) -> None:
    """The header parses and its tensors end exactly where the file does (no truncation)."""
    from safetensors import safe_open

    size = path.stat().st_size
    try:
        with safe_open(str(path), framework="pt") as weights:
            if not list(weights.keys()):
                raise SnapshotError(f"weights file {path} holds no tensors")
    except SnapshotError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError for bad files
        raise SnapshotError(
            f"weights file {path} ({size} bytes) is not a valid safetensors file, probably "
            f"truncated or corrupted: {exc}"
        ) from exc


def _check_bin(path: Path) -> None:
    """A ``.bin`` loads through torch's weights-only unpickler, which refuses pickled code."""
    import torch

    try:
        # mmap: the tensors are mapped, not read, so this costs no memory for large files.
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        if not zipfile.is_zipfile(path):
            snapshot = str(path.parent)
            raise SnapshotError(
                f"weights file {path} is in torch's legacy format (saved before torch 1.6, or "
                "with _use_new_zipfile_serialization=False), not a zip archive: it cannot be "
                "memory-mapped, so it cannot be checked without reading all of it into memory. "
                "Convert the snapshot to safetensors once (it loads the model once; "
                "transformers and log_llm then use model.safetensors): "
                "`from transformers import AutoModelForCausalLM; AutoModelForCausalLM."
                f"from_pretrained({snapshot!r}, dtype='auto').save_pretrained({snapshot!r})`"
            ) from exc
        raise SnapshotError(
            f"weights file {path} does not load with torch's weights-only loader (truncated, "
            f"corrupted, or holding pickled code, which is never run): {exc}"
        ) from exc
