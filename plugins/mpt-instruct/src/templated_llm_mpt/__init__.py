"""The MPT-instruct plugin for templated-llm: mosaicml/mpt-7b-instruct and its relatives.

transformers ships a native ``MptForCausalLM``, so no remote code runs; its attention is the
eager implementation only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from templated_llm import AttentionUnavailableError, ModelSpec, hookimpl

MODEL_NAME = "mpt-instruct"
SUPPORTED_ATTENTION = ("auto", "eager")


def _ours(spec: ModelSpec) -> bool:
    return spec.name == MODEL_NAME


@hookimpl
def register_models(register):
    register(
        ModelSpec(
            name=MODEL_NAME,
            repo_id="mosaicml/mpt-7b-instruct",
            template="mpt-instruct.jinja",
            generation_defaults={"temperature": 0.1, "max_tokens": 256},
            description="MPT-7B-instruct, Dolly/HH-RLHF-tuned, '### Instruction' prompt format",
        )
    )


@hookimpl
def select_attention(spec: ModelSpec, requested: str, device: str) -> str | None:
    if not _ours(spec):
        return None
    if requested not in SUPPORTED_ATTENTION:
        raise AttentionUnavailableError(
            f"the {MODEL_NAME} plugin does not support attention backend {requested!r}; "
            f"supported: {list(SUPPORTED_ATTENTION)}"
        )
    return "eager"


@hookimpl
def load_model(spec: ModelSpec, snapshot: Path, dtype: Any, device: str, attention: str) -> Any:
    if not _ours(spec):
        return None
    from transformers import MptForCausalLM

    # The native class, not AutoModel: mosaicml's configs point auto_map at remote code.
    model = MptForCausalLM.from_pretrained(snapshot, dtype=dtype, device_map=device)
    return model.eval()


@hookimpl
def configure_attention(spec: ModelSpec, model: Any, attention: str) -> str | None:
    return "eager" if _ours(spec) else None
