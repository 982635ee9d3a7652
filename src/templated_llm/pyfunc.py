"""``TemplatedLLM``: one MLflow pyfunc for every plugin-provided causal LM."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException

from templated_llm.generation import context_length, encode, generate, prepare_tokenizer
from templated_llm.inputs import to_prompts
from templated_llm.logged_config import LoggedConfig, default_device, torch_dtype
from templated_llm.params import validate_params
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
            "select_attention", spec=spec, requested=config.attention, device=self.device,
            snapshot=snapshot,
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
        # transformers' generate is not documented as thread-safe on a shared model; a served
        # model handles one batch at a time and gets its concurrency from batching.
        self._lock = threading.Lock()
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
        batch = encode(self.tokenizer, self.render(to_prompts(model_input)), self.device)
        self._check_context(batch, generation.max_tokens)
        with self._lock:
            texts = generate(self.model, self.tokenizer, batch, generation, self.device)
        return pd.DataFrame({OUTPUT_COLUMN: texts})

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
