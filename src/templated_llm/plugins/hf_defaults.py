"""The core's hook implementations: any Hugging Face causal LM through the ``Auto*`` classes.

Registered last-resort (``trylast``) so a plugin overrides only what differs for its models.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from templated_llm.errors import AttentionUnavailableError
from templated_llm.plugins.hookspecs import hookimpl
from templated_llm.model_logging.snapshot import remote_code_reason
from templated_llm.spec import ModelSpec
from templated_llm.runtime.templates import find_template

_logger = logging.getLogger(__name__)

# Our backend names -> transformers' attn_implementation.
_HF_ATTENTION = {
    "eager": "eager",
    "sdpa": "sdpa",
    "flash": "flash_attention_2",
    "triton": "flex_attention",
}
# The flag a transformers model class sets when it implements the backend.
_HF_SUPPORT_FLAG = {
    "sdpa": "_supports_sdpa",
    "flash": "_supports_flash_attn",
    "triton": "_supports_flex_attn",
}
ATTENTION_BACKENDS = ("auto", *_HF_ATTENTION)
_FLASH_ATTN_MIN_VERSION = (2, 6)  # flash_attn_with_kvcache's cache_leftpad (left padding)


def check_attention_name(requested: str) -> None:
    if requested not in ATTENTION_BACKENDS:
        raise AttentionUnavailableError(
            f"unknown attention backend {requested!r}; choose one of {list(ATTENTION_BACKENDS)}"
        )


def _flash_attn_version() -> tuple[int, ...] | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    version = importlib.metadata.version("flash-attn").split("+")[0]
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def attention_unavailable(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot run on ``device`` in this environment, or ``None`` if it can.

    This checks the machine and the installed packages, not the model.
    """
    on_cuda = device.startswith("cuda")
    if backend == "flash":
        if not on_cuda or not _cuda_available():
            where = f"runs on {device!r}" if not on_cuda else "sees no CUDA GPU (torch.cuda)"
            return (f"attention backend 'flash' needs a CUDA GPU; this process {where}. "
                    "Use attention='auto' or 'sdpa'.")
        version = _flash_attn_version()
        if version is None or version < _FLASH_ATTN_MIN_VERSION:
            found = "not installed" if version is None else ".".join(map(str, version))
            return ("attention backend 'flash' needs the flash-attn package, version "
                    f"{'.'.join(map(str, _FLASH_ATTN_MIN_VERSION))} or later (found: {found}). "
                    "Run `pip install flash-attn --no-build-isolation`, or use attention='auto'.")
    if backend == "triton":
        if on_cuda and importlib.util.find_spec("triton") is None:
            return ("attention backend 'triton' compiles flex_attention to Triton kernels and "
                    "needs the triton package on CUDA. Run `pip install triton`, or use "
                    "attention='auto' or 'sdpa'.")
        if not on_cuda and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
            return ("attention backend 'triton' on CPU compiles flex_attention to C++ and needs "
                    "a C++ compiler (g++ or clang++) on PATH; none was found. Install one, or "
                    "use attention='auto' or 'sdpa'.")
    return None


def check_attention_available(backend: str, device: str) -> None:
    """Raise :class:`AttentionUnavailableError` when ``backend`` cannot run on ``device``."""
    reason = attention_unavailable(backend, device)
    if reason is not None:
        raise AttentionUnavailableError(reason)


def choose_auto(device: str, supported: tuple[str, ...] = ("flash", "sdpa", "eager")) -> str:
    """What ``auto`` means here: flash on CUDA with flash-attn, else sdpa, else eager.

    ``supported`` are the backends the model can use; the choice is logged.
    """
    for backend in ("flash", "sdpa", "eager"):
        if backend in supported and attention_unavailable(backend, device) is None:
            _logger.info("attention 'auto' chose %r on %s", backend, device)
            return backend
    raise AttentionUnavailableError(f"no attention backend of {list(supported)} can run on {device!r}")


def _model_class(snapshot: Path) -> type | None:
    """The transformers class ``AutoModelForCausalLM`` would load from ``snapshot``, if known.

    Read from ``config.json``'s ``model_type`` alone: building the config could run (or prompt
    for) remote code before the remote-code check has had its say.
    """
    try:
        model_type = json.loads((snapshot / "config.json").read_text(encoding="utf-8"))["model_type"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no readable config: the snapshot checks name the problem
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return getattr(transformers, class_name, None) if class_name else None  # None: remote code


def _class_supports(model_class: type | None, backend: str) -> bool:
    flag = _HF_SUPPORT_FLAG.get(backend)
    return model_class is None or flag is None or bool(getattr(model_class, flag, False))


@hookimpl(trylast=True)
def prompt_template(spec: ModelSpec) -> Path:
    return find_template(spec.template)


@hookimpl(trylast=True)
def select_attention(spec: ModelSpec, requested: str, device: str, snapshot: Path | None) -> str:
    check_attention_name(requested)
    # The model class is known only when the snapshot is local; otherwise loading checks it.
    model_class = _model_class(Path(snapshot)) if snapshot is not None else None
    if requested == "auto":
        if model_class is None:
            # Remote code or not yet downloaded: transformers picks what the class supports.
            return "auto"
        return choose_auto(
            device, tuple(b for b in ("flash", "sdpa", "eager") if _class_supports(model_class, b))
        )
    check_attention_available(requested, device)
    if not _class_supports(model_class, requested):
        usable = [b for b in _HF_ATTENTION if _class_supports(model_class, b)]
        raise AttentionUnavailableError(
            f"{model_class.__name__} (model {spec.name!r}) does not implement attention backend "
            f"{requested!r} in transformers; it supports {usable}. Use one of those or 'auto', "
            "or install a plugin that provides the backend for this model."
        )
    return requested


@hookimpl(trylast=True)
def needs_remote_code(spec: ModelSpec, snapshot: Path) -> str:
    return remote_code_reason(snapshot)


@hookimpl(trylast=True)
def load_tokenizer(spec: ModelSpec, snapshot: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(snapshot, trust_remote_code=trust_remote_code)


@hookimpl(trylast=True)
def load_model(
    spec: ModelSpec, snapshot: Path, dtype: Any, device: str, attention: str, trust_remote_code: bool
) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        snapshot,
        dtype=dtype,
        device_map=device,  # load straight onto the device, without a second copy in RAM
        attn_implementation=_HF_ATTENTION.get(attention),
        trust_remote_code=trust_remote_code,  # False unless the user opted in when logging
        weights_only=True,  # .bin weights through torch's weights-only unpickler, never plain pickle
    )
    return model.eval()


@hookimpl(trylast=True)
def configure_attention(spec: ModelSpec, model: Any, attention: str) -> str:
    in_use = getattr(model.config, "_attn_implementation", None) or "eager"
    return {hf: ours for ours, hf in _HF_ATTENTION.items()}.get(in_use, in_use)
