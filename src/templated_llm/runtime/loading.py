"""The load path: a model's template, tokenizer and model, from its plugin's hooks.

Shared by ``log_llm`` (which checks that they would load), ``TemplatedLLM.load_context`` and
``templated-llm render``, so each hook is called, and its answer checked, in one place.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from templated_llm.engine.adapters import ModelAdapter
from templated_llm.errors import (
    AttentionUnavailableError,
    PluginError,
    RemoteCodeWarning,
    SnapshotError,
    TemplateError,
)
from templated_llm.model_logging.config import LoggedConfig
from templated_llm.model_logging.snapshot import resolve_snapshot
from templated_llm.plugins import attention as attention_table
from templated_llm.plugins.manager import answers, first_answer, get_model_spec
from templated_llm.runtime.device import DTypeChoice, checkpoint_dtype, choose_dtype, load_device
from templated_llm.runtime.generation import keep_mechanics_only
from templated_llm.runtime.inputs import Row
from templated_llm.runtime.memory import check_load
from templated_llm.runtime.packed_linear import convert_weights, pack_linear_layers
from templated_llm.runtime.prompts import PromptRenderer
from templated_llm.runtime.templates import PromptTemplate, find_template
from templated_llm.runtime.tokens import add_special_tokens, prepare_tokenizer, tokenize
from templated_llm.spec import ModelSpec

_logger = logging.getLogger(__name__)
_SHOWN_CHARACTERS = 80  # of an answer refused, in the error


def _answer(hook: str, spec: ModelSpec, accepts: Callable[[Any], bool], allowed: str, **kwargs: Any) -> Any:
    """Call first-result ``hook`` for ``spec``; an answer ``accepts`` refuses is a PluginError
    naming the plugin that gave it, what it gave and what is ``allowed``, here rather than as a
    traceback from where the answer is first used."""
    answer, plugin = first_answer(hook, spec=spec, **kwargs)
    if not accepts(answer):
        shown = repr(answer)
        if len(shown) > _SHOWN_CHARACTERS:
            shown = shown[:_SHOWN_CHARACTERS - 3] + "..."
        raise PluginError(f"plugin {plugin!r} answered hook {hook!r} for model {spec.name!r} with a "
                          f"{type(answer).__name__}, {shown}; it must answer {allowed}")
    return answer


def _attention_names() -> list[str]:
    return [entry.name for entry in attention_table.backends()]


def select_attention(spec: ModelSpec, requested: str, device: str, snapshot: Path | None) -> str:
    """The attention backend ``spec`` runs with on ``device``: ``requested``, or ``auto``'s choice.

    The name is validated by the attention table, then the plugins choose (``select_attention``).
    """
    attention_table.check_name(requested)
    return _answer("select_attention", spec, lambda chosen: chosen in _attention_names(),
                   f"a name of the attention table: {_attention_names()}",
                   requested=requested, device=device, snapshot=snapshot)


def needs_remote_code(spec: ModelSpec, snapshot: Path) -> str | None:
    """Why loading ``snapshot`` would run Python code shipped with it, as the plugins say
    (``None``: it would not)."""
    return _answer("needs_remote_code", spec, lambda answer: answer is None or isinstance(answer, str),
                   "a str saying why, or None", snapshot=snapshot)


def template_path(spec: ModelSpec, template: str | os.PathLike[str] | None = None) -> Path:
    """The Jinja template: ``template`` (a file or a shipped name) if given, else the plugin's."""
    if template is not None:
        return find_template(template)
    return Path(_answer("prompt_template", spec, lambda path: isinstance(path, (str, os.PathLike)),
                        "the path of a Jinja template file (a str or a Path)"))


def load_tokenizer(spec: ModelSpec, snapshot: Path, trust_remote_code: bool) -> Any:
    """The plugin's tokenizer for ``snapshot``, set up for batched generation.

    A tokenizer.json without tokenizer_config.json names no end-of-text token: the model's
    config (generation_config.json, else config.json) names it then. With none at all, batches
    cannot be padded: refused, naming what the snapshot lacks.
    """
    from transformers import PreTrainedTokenizerBase

    tokenizer = _answer("load_tokenizer", spec, lambda answer: isinstance(answer, PreTrainedTokenizerBase),
                        "a transformers tokenizer (PreTrainedTokenizerBase)",
                        snapshot=snapshot, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token is None and (eos := _config_eos_id(snapshot)) is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    tokenizer = prepare_tokenizer(tokenizer)
    if tokenizer.pad_token is None:
        raise SnapshotError(
            f"the tokenizer of snapshot {snapshot} has no end-of-text or padding token, and the "
            "model's config names no eos_token_id: the snapshot lacks tokenizer_config.json "
            "(or special_tokens_map.json) naming them. Add the repository's own files")
    return tokenizer


def _config_eos_id(snapshot: Path) -> int | None:
    for name in ("generation_config.json", "config.json"):
        try:
            eos = json.loads((Path(snapshot) / name).read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int):
            return eos
    return None


@dataclass(frozen=True)
class LoadedModel:
    """A model on its device in its dtype, with the attention backend it runs, and the KV cache
    budget, in tokens, of a whole batch where it runs without the engine (``None``: unbounded;
    see :func:`~templated_llm.runtime.memory.check_load`)."""

    model: Any
    device: str
    attention: str
    dtype: str
    batch_cache_tokens: int | None


def load_model(spec: ModelSpec, config: LoggedConfig, snapshot: Path, tokenizer: Any) -> LoadedModel:
    """Load the logged model's weights through the hooks, in the dtype chosen for the device,
    once the memory check has passed; its attention backend installed and the plugins'
    adjustments (``prepare_model``) made; on CPU, its linear layers packed."""
    device = load_device(config.device)
    attention = select_attention(spec, config.attention, device, snapshot)
    choice = choose_dtype(config.dtype, device, snapshot)
    _logger.info("dtype %s on %s: %s", choice.name, device, choice.reason)
    # Before any weight is read: refuse a model that cannot fit.
    batch_cache_tokens = check_load(snapshot, config, choice, device)
    model = _load_weights(spec, snapshot, choice, device, attention, config.trust_remote_code)
    _keep_mechanics_only(model, "the snapshot's generation_config.json", logging.INFO)
    # A name outside the table is the plugin's mistake, not a backend to log the model with.
    in_use = _answer("configure_attention", spec, lambda answer: answer in _attention_names(),
                     f"the attention backend now in use, a name of the attention table: {_attention_names()}",
                     model=model, attention=attention)
    if in_use != attention:
        raise AttentionUnavailableError(
            f"model {spec.name!r} was to run attention backend {attention!r}, but after loading "
            f"it runs {in_use!r}; log it with attention={in_use!r} or 'eager'"
        )
    for _ in answers("prepare_model", spec=spec, model=model, tokenizer=tokenizer):
        pass  # every plugin's, in turn
    # The engine reads only the token ids: what else a plugin sets would apply off it only.
    _keep_mechanics_only(model, "a plugin's prepare_model", logging.WARNING)
    if config.pack_weights and device == "cpu":
        pack_linear_layers(model)
    return LoadedModel(model, device, attention, choice.name, batch_cache_tokens)


def engine_adapter(spec: ModelSpec, model: Any, attention: str) -> ModelAdapter | None:
    """The plugins' adapter that runs ``model`` on the continuous-batching engine, if one can."""
    return _answer("engine_adapter", spec, lambda answer: answer is None or isinstance(answer, ModelAdapter),
                   "a templated_llm.engine.ModelAdapter, or None", model=model, attention=attention)


def _keep_mechanics_only(model: Any, source: str, level: int) -> None:
    if ignored := keep_mechanics_only(model):
        _logger.log(
            level, "%s sets %s in model.generation_config: generation ignores them, on the engine "
            "and off it; the plugin's generation_defaults and each request's params decide the "
            "output", source, ", ".join(f"{k}={v!r}" for k, v in sorted(ignored.items())))


def _load_weights(spec: ModelSpec, snapshot: Path, choice: DTypeChoice, device: str, attention: str,
                  trust_remote_code: bool) -> Any:
    """The plugin's model in the chosen dtype.

    On CPU, a checkpoint stored in another dtype loads in its own (memory-mapped, not copied)
    and is converted here one tensor at a time, so the weights are resident about once at the
    new dtype; converting while loading would hold both.
    """
    stored = checkpoint_dtype(snapshot)
    convert = device == "cpu" and stored is not None and stored != choice.name
    model = _answer(
        "load_model", spec, lambda answer: isinstance(answer, torch.nn.Module),
        "a torch.nn.Module: the loaded causal LM",
        snapshot=snapshot, dtype=getattr(torch, stored) if convert else choice.torch_dtype,
        device=device, attention=attention, trust_remote_code=trust_remote_code,
    )
    if convert:
        convert_weights(model, choice.torch_dtype)
        model.config.dtype = choice.torch_dtype
    return model


def warn_if_remote_code(config: LoggedConfig, snapshot: Path) -> None:
    """Warn, on every load, that a model logged with ``trust_remote_code=True`` may run its code."""
    if config.trust_remote_code:
        warnings.warn(
            f"model {config.model!r} was logged with trust_remote_code=True: loading it may run "
            f"Python code shipped in its snapshot ({snapshot}). Load it only if you trust that code.",
            RemoteCodeWarning,
            stacklevel=3,
        )


def render_prompt(
    model: str,
    row: Row,
    *,
    variables: dict[str, str] | None = None,
    template: str | os.PathLike[str] | None = None,
    snapshot: str | os.PathLike[str] | None = None,
) -> str:
    """The exact prompt model ``model`` sees for ``row``, without loading any weights.

    With a local ``snapshot`` the text is what its tokenizer reads, special tokens it adds (a
    ``<s>``) included; without one, the template's output. Models rendered by their tokenizer's
    chat template need the snapshot.
    """
    spec = get_model_spec(model)
    unknown = sorted(set(variables or {}) - set(spec.template_variables))
    if unknown:
        raise TemplateError(
            f"model {model!r} has no template variables {unknown}; its variables: "
            f"{sorted(spec.template_variables) or 'none'}"
        )
    tokenizer = None
    if snapshot is not None:
        tokenizer = load_tokenizer(spec, resolve_snapshot(spec, snapshot), trust_remote_code=False)
    elif spec.tokenizer_chat_template:
        raise TemplateError(
            f"model {model!r} renders prompts with its tokenizer's chat template; pass the "
            "snapshot whose tokenizer to use"
        )
    renderer = PromptRenderer(spec, PromptTemplate.from_file(template_path(spec, template)), tokenizer)
    text = renderer.render(row, variables)
    if tokenizer is None:
        return text
    [ids] = tokenize(tokenizer, [text], add_special_tokens(spec))
    return tokenizer.decode(ids)
