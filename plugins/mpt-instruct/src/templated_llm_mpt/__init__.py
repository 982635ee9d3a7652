"""The MPT-instruct plugin for templated-llm: mosaicml/mpt-7b-instruct and its relatives.

transformers ships a native ``MptForCausalLM``, so no remote code runs; its attention is the
eager implementation only, and this plugin installs the others (see ``attention.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from templated_llm import ModelSpec, hookimpl
from templated_llm.plugins import attention as attention_table

MODEL_NAME = "mpt-instruct"


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
            chat_as_instruction=True,
            model_types=("mpt",),  # loaded with MptForCausalLM, whatever the snapshot holds
            description="MPT-7B-instruct, Dolly/HH-RLHF-tuned, '### Instruction' prompt format",
        )
    )


@hookimpl
def select_attention(spec: ModelSpec, requested: str, device: str) -> str | None:
    if not _ours(spec):
        return None
    from templated_llm_mpt.attention import FAST_BACKENDS

    # eager is transformers' own, and this plugin installs the others.
    return attention_table.resolve(requested, device, ("eager", *FAST_BACKENDS), f"MPT (model {spec.name!r})")


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
    if not _ours(spec):
        return None
    if attention == "eager":
        return "eager"
    from templated_llm_mpt.attention import install_attention

    return install_attention(model, attention)


@hookimpl
def engine_adapter(spec: ModelSpec, model: Any, attention: str) -> Any:
    if not _ours(spec):
        return None
    from templated_llm_mpt.engine import MptAdapter

    return MptAdapter(model, attention)
