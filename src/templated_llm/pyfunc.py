"""``TemplatedLLM``: one MLflow pyfunc for every plugin-provided causal LM."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException

from templated_llm.generation import (
    Completion,
    context_length,
    encode,
    generate_completions,
    prepare_tokenizer,
    stream,
)
from templated_llm.inputs import has_messages, to_conversations, to_prompts
from templated_llm.logged_config import LoggedConfig, default_device, torch_dtype
from templated_llm.params import GenerationParams, split_template_variables, validate_params
from templated_llm.plugin_manager import call_first, get_model_spec
from templated_llm.rendering import PromptRenderer, Row
from templated_llm.templates import PromptTemplate

_logger = logging.getLogger(__name__)

OUTPUT_COLUMN = "candidates"
#: Columns added to ``candidates`` when a request sets ``return_usage``.
USAGE_COLUMNS = ("prompt_tokens", "completion_tokens", "finish_reason")


class TemplatedLLM(mlflow.pyfunc.PythonModel):
    """Renders each prompt through the model's Jinja template and generates in one batch.

    Everything model-specific comes from the plugin that serves the model, found through the
    ``templated_llm`` hooks when the model is loaded.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = LoggedConfig.model_validate(context.model_config)
        spec = get_model_spec(config.model, config.plugin_module)
        snapshot = Path(context.artifacts["snapshot"])
        self.device = config.device or default_device()
        self.attention = call_first(
            "select_attention", spec=spec, requested=config.attention, device=self.device
        )
        self.tokenizer = prepare_tokenizer(
            call_first("load_tokenizer", spec=spec, snapshot=snapshot)
        )
        self.model = call_first(
            "load_model",
            spec=spec,
            snapshot=snapshot,
            dtype=torch_dtype(config.dtype, self.device),
            device=self.device,
            attention=self.attention,
        )
        self.attention = call_first(
            "configure_attention", spec=spec, model=self.model, attention=self.attention
        )
        self.template = PromptTemplate.from_file(context.artifacts["template"])
        self.renderer = PromptRenderer(spec, self.template, self.tokenizer)
        self.generation_defaults = config.generation_defaults
        self.context_length = context_length(self.model)
        # transformers' generate is not documented as thread-safe on a shared model; a served
        # model handles one batch at a time and gets its concurrency from batching.
        self._lock = threading.Lock()
        _logger.info(
            "loaded %s (plugin %s) on %s with %s attention",
            spec.name, spec.plugin_name, self.device, self.attention,
        )

    def render(self, rows: list[Row], variables: dict[str, str] | None = None) -> list[str]:
        """The exact text the model sees for each row: a prompt, or a list of chat messages.

        ``variables`` override the template variables' defaults (``system``, ...).
        """
        return [self.renderer.render(row, variables) for row in rows]

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        # MLflow hands a DataFrame; direct calls may also pass a list or dict (see to_prompts).
        # A DataFrame hint is one MLflow derives no schema from: our signature is explicit.
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        batch, generation = self._prepare(model_input, params)
        with self._lock:
            completions = generate_completions(self.model, self.tokenizer, batch, generation, self.device)
        return _output(completions, generation.return_usage)

    def predict_stream(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: Any,
        params: dict[str, Any] | None = None,
    ) -> Iterator[str]:
        """Yield the completion of one prompt (or one conversation) in chunks as it generates."""
        batch, generation = self._prepare(model_input, params)
        rows = int(batch["input_ids"].shape[0])
        if rows != 1:
            raise MlflowException.invalid_parameter_value(
                f"predict_stream takes one prompt or conversation; received {rows}"
            )
        return stream(self.model, self.tokenizer, batch, generation, self.device, self._lock)

    def _prepare(self, model_input: Any, params: dict[str, Any] | None) -> tuple[dict[str, Any], GenerationParams]:
        variables, params = split_template_variables(params, self.renderer.spec.template_variables)
        generation = validate_params(params, self.generation_defaults)
        rows = to_conversations(model_input) if has_messages(model_input) else to_prompts(model_input)
        batch = encode(self.tokenizer, self.render(rows, variables), self.device,
                       add_special_tokens=self.renderer.add_special_tokens)
        self._check_context(batch, generation.max_tokens)
        return batch, generation

    def _check_context(self, batch: dict[str, Any], max_tokens: int) -> None:
        if self.context_length is None:
            return
        longest = int(batch["attention_mask"].sum(dim=1).max())
        if longest + max_tokens > self.context_length:
            raise MlflowException.invalid_parameter_value(
                f"the longest prompt is {longest} tokens after templating; with max_tokens="
                f"{max_tokens} that exceeds the model's context of {self.context_length} tokens. "
                "Shorten the prompt or lower max_tokens."
            )


def _output(completions: list[Completion], usage: bool) -> pd.DataFrame:
    columns = {OUTPUT_COLUMN: [c.text for c in completions]}
    if usage:
        columns.update({name: [getattr(c, name) for c in completions] for name in USAGE_COLUMNS})
    return pd.DataFrame(columns)
