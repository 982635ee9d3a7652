"""The core's hook implementations: any Hugging Face causal LM through the ``Auto*`` classes.

Registered last-resort (``trylast``) so a plugin overrides only what differs for its models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from templated_llm.model_logging.snapshot import remote_code_reason
from templated_llm.plugins import attention as attention_table
from templated_llm.plugins.hookspecs import hookimpl
from templated_llm.runtime.templates import find_template
from templated_llm.spec import ModelSpec


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


def _installable(model_class: type | None) -> list[str]:
    """The table's backends transformers installs into ``model_class`` (all it can, if unknown)."""
    return [
        b.name for b in attention_table.backends()
        if b.transformers_name is not None
        and (model_class is None or b.support_flag is None or getattr(model_class, b.support_flag, False))
    ]


@hookimpl(trylast=True)
def prompt_template(spec: ModelSpec) -> Path:
    return find_template(spec.template, shipped_first=True)


@hookimpl(trylast=True)
def select_attention(spec: ModelSpec, requested: str, device: str, snapshot: Path | None) -> str:
    model_class = _model_class(Path(snapshot)) if snapshot is not None else None
    if model_class is None and requested == attention_table.AUTO:
        # Remote code (or a snapshot not yet downloaded): the class cannot be read without running
        # its code, so auto takes eager, which every class implements; ask for another explicitly.
        return attention_table.resolve(requested, device, ["eager"])
    # Without a class (log time, no local snapshot) only the machine is checked; loading checks it.
    owner = f"{getattr(model_class, '__name__', '?')} (model {spec.name!r}) in transformers"
    return attention_table.resolve(requested, device, _installable(model_class), owner)


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
        attn_implementation=attention_table.backend(attention).transformers_name,
        trust_remote_code=trust_remote_code,  # False unless the user opted in when logging
        weights_only=True,  # .bin weights through torch's weights-only unpickler, never plain pickle
    )
    return model.eval()


@hookimpl(trylast=True)
def configure_attention(spec: ModelSpec, model: Any, attention: str) -> str:
    # transformers installed the backend at load: report the one it runs.
    return attention_table.from_transformers(getattr(model.config, "_attn_implementation", None) or "eager")


@hookimpl(trylast=True)
def engine_adapter(spec: ModelSpec, model: Any, attention: str) -> Any:
    from templated_llm.engine import HuggingFaceAdapter

    return HuggingFaceAdapter(model) if HuggingFaceAdapter.supports(model, attention) else None
