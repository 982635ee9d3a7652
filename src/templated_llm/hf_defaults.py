"""The core's hook implementations: any Hugging Face causal LM through the ``Auto*`` classes.

Registered last-resort (``trylast``) so a plugin overrides only what differs for its models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from templated_llm.errors import AttentionUnavailableError
from templated_llm.hookspecs import hookimpl
from templated_llm.snapshot_check import remote_code_reason
from templated_llm.spec import ModelSpec
from templated_llm.templates import find_template

# Our backend names -> transformers' attn_implementation.
_HF_ATTENTION = {
    "eager": "eager",
    "sdpa": "sdpa",
    "flash": "flash_attention_2",
    "triton": "flex_attention",
}
ATTENTION_BACKENDS = ("auto", *_HF_ATTENTION)


def check_attention_name(requested: str) -> None:
    if requested not in ATTENTION_BACKENDS:
        raise AttentionUnavailableError(
            f"unknown attention backend {requested!r}; choose one of {list(ATTENTION_BACKENDS)}"
        )


@hookimpl(trylast=True)
def prompt_template(spec: ModelSpec) -> Path:
    return find_template(spec.template)


@hookimpl(trylast=True)
def select_attention(spec: ModelSpec, requested: str, device: str) -> str:
    check_attention_name(requested)
    if requested == "flash" and not device.startswith("cuda"):
        raise AttentionUnavailableError(
            "attention backend 'flash' needs a CUDA GPU and the flash-attn package; "
            f"this process runs on {device!r}. Use attention='auto' or 'sdpa'."
        )
    # "auto" lets transformers pick the best implementation the model class supports.
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
