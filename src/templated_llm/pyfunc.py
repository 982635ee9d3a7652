"""``TemplatedLLM``: one MLflow pyfunc for every plugin-provided causal LM."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException

from templated_llm.batching import MicroBatcher
from templated_llm.generation import context_length, generate, pad, prepare_tokenizer, tokenize
from templated_llm.inputs import to_prompts
from templated_llm.logged_config import LoggedConfig, default_device, torch_dtype
from templated_llm.params import GenerationParams, validate_params
from templated_llm.plugin_manager import call_first, get_model_spec
from templated_llm.templates import PromptTemplate

_logger = logging.getLogger(__name__)

OUTPUT_COLUMN = "candidates"


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
        self.generation_defaults = config.generation_defaults
        self.context_length = context_length(self.model)
        # transformers' generate is not documented as thread-safe on a shared model: one batch
        # runs at a time, and concurrent requests (a server's threads) join the next batch.
        self._batcher = MicroBatcher(self._generate)
        _logger.info(
            "loaded %s (plugin %s) on %s with %s attention",
            spec.name, spec.plugin_name, self.device, self.attention,
        )

    def render(self, prompts: list[str]) -> list[str]:
        """The exact text the model sees for each user prompt."""
        return [self.template.render(prompt) for prompt in prompts]

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        # MLflow hands a DataFrame; direct calls may also pass a list or dict (see to_prompts).
        # A DataFrame hint is one MLflow derives no schema from: our signature is explicit.
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        generation = validate_params(params, self.generation_defaults)
        input_ids = tokenize(self.tokenizer, self.render(to_prompts(model_input)))
        self._check_context(input_ids, generation.max_tokens)
        return pd.DataFrame({OUTPUT_COLUMN: self._batcher.submit(input_ids, generation)})

    def _generate(self, input_ids: list[list[int]], generation: GenerationParams) -> list[str]:
        batch = pad(self.tokenizer, input_ids, self.device)
        return generate(self.model, self.tokenizer, batch, generation, self.device)

    def _check_context(self, input_ids: list[list[int]], max_tokens: int) -> None:
        if self.context_length is None:
            return
        longest = max(len(ids) for ids in input_ids)
        if longest + max_tokens > self.context_length:
            raise MlflowException.invalid_parameter_value(
                f"the longest prompt is {longest} tokens after templating; with max_tokens="
                f"{max_tokens} that exceeds the model's context of {self.context_length} tokens. "
                "Shorten the prompt or lower max_tokens."
            )
