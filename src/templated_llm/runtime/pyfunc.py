"""``TemplatedLLM``: one MLflow pyfunc for every plugin-provided causal LM."""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException

from templated_llm.runtime.batching import MicroBatcher
from templated_llm.runtime.generation import (
    Completion,
    context_length,
    generate_completions,
    pad,
    prepare_tokenizer,
    stream,
    tokenize,
)
from templated_llm.runtime.inputs import has_messages, to_conversations, to_prompts
from templated_llm.model_logging.config import LoggedConfig, default_device, torch_dtype
from templated_llm.runtime.packed_linear import pack_linear_layers
from templated_llm.runtime.params import GenerationParams, split_template_variables, validate_params
from templated_llm.plugins.manager import call_first, get_model_spec
from templated_llm.runtime.prompts import PromptRenderer, Row
from templated_llm.runtime.templates import PromptTemplate

_logger = logging.getLogger(__name__)

OUTPUT_COLUMN = "candidates"
# JSON's "\udXXX" escapes can carry lone surrogates, which no tokenizer can encode.
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
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
            "select_attention", spec=spec, requested=config.attention, device=self.device,
            snapshot=snapshot,
        )
        _warn_if_remote_code(config, snapshot)
        self.tokenizer = prepare_tokenizer(call_first(
            "load_tokenizer", spec=spec, snapshot=snapshot, trust_remote_code=config.trust_remote_code
        ))
        self.model = call_first(
            "load_model",
            spec=spec,
            snapshot=snapshot,
            dtype=torch_dtype(config.dtype, self.device),
            device=self.device,
            attention=self.attention,
            trust_remote_code=config.trust_remote_code,
        )
        self.attention = call_first(
            "configure_attention", spec=spec, model=self.model, attention=self.attention
        )
        if config.pack_weights and self.device == "cpu":
            pack_linear_layers(self.model)
        self.template = PromptTemplate.from_file(context.artifacts["template"])
        self.renderer = PromptRenderer(spec, self.template, self.tokenizer)
        self.generation_defaults = config.generation_defaults
        self.context_length = context_length(self.model)
        self.max_rows_per_request = config.max_rows_per_request
        self.max_tokens_limit = config.max_tokens_limit
        self._max_prompt_chars = _max_prompt_chars(self.tokenizer, self.context_length)
        # transformers reconfigures the shared Rust tokenizer per call, and calls at once can
        # fail ("Already borrowed"): tokenizing is serialised, and cheap next to generating.
        self._tokenizer_lock = threading.Lock()
        # transformers' generate is not documented as thread-safe on a shared model: one batch
        # runs at a time, and concurrent requests (a server's threads) join the next batch.
        self._batcher = MicroBatcher(self._generate)
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
        input_ids, generation = self._prepare(model_input, params)
        return _output(self._batcher.submit(input_ids, generation), generation.return_usage)

    def predict_stream(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: Any,
        params: dict[str, Any] | None = None,
    ) -> Iterator[str]:
        """Yield the completion of one prompt (or one conversation) in chunks as it generates."""
        input_ids, generation = self._prepare(model_input, params)
        if len(input_ids) != 1:
            raise MlflowException.invalid_parameter_value(
                f"predict_stream takes one prompt or conversation; received {len(input_ids)}"
            )
        batch = pad(self.tokenizer, input_ids, self.device)
        # The model alone for the whole stream: no batch runs beside it.
        return stream(self.model, self.tokenizer, batch, generation, self.device, self._batcher.lock)

    def _prepare(
        self, model_input: Any, params: dict[str, Any] | None
    ) -> tuple[list[list[int]], GenerationParams]:
        """Validated params and each row's token ids, every limit checked before generation."""
        variables, params = split_template_variables(params, self.renderer.spec.template_variables)
        generation = validate_params(params, self.generation_defaults)
        rows = to_conversations(model_input) if has_messages(model_input) else to_prompts(model_input)
        self._check_limits(len(rows), generation.max_tokens)
        _check_encodable(rows)
        rendered = self.render(rows, variables)
        self._check_prompt_chars(rendered)
        with self._tokenizer_lock:
            input_ids = tokenize(self.tokenizer, rendered, self.renderer.add_special_tokens)
        self._check_context(input_ids, generation.max_tokens)
        return input_ids, generation

    def _check_limits(self, rows: int, max_tokens: int) -> None:
        # The limits logged with the model; checked before any tokenizing or generation.
        if rows > self.max_rows_per_request:
            raise MlflowException.invalid_parameter_value(
                f"the request has {rows} prompts; this model accepts at most "
                f"{self.max_rows_per_request} per request (max_rows_per_request, set when it was "
                "logged). Split the request."
            )
        if max_tokens > self.max_tokens_limit:
            raise MlflowException.invalid_parameter_value(
                f"param 'max_tokens': at most {self.max_tokens_limit} for this model "
                f"(max_tokens_limit, set when it was logged); received {max_tokens}"
            )

    def _check_prompt_chars(self, rendered: list[str]) -> None:
        # Rejects, without tokenizing it, text too long to fit the context whatever its tokens.
        for row, text in enumerate(rendered):
            if self._max_prompt_chars is not None and len(text) > self._max_prompt_chars:
                raise MlflowException.invalid_parameter_value(
                    f"the prompt at row {row} is {len(text)} characters after templating; no text "
                    f"over {self._max_prompt_chars} characters fits the model's context of "
                    f"{self.context_length} tokens. Shorten the prompt."
                )

    def _generate(self, input_ids: list[list[int]], generation: GenerationParams) -> list[Completion]:
        batch = pad(self.tokenizer, input_ids, self.device)
        return generate_completions(self.model, self.tokenizer, batch, generation, self.device)

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


def _max_prompt_chars(tokenizer: Any, context: int | None) -> int | None:
    """A length no text that fits ``context`` tokens can exceed.

    A token covers at most as many characters as its longest vocabulary entry (byte-level and
    SentencePiece entries spell out at least the text they stand for); doubled for
    normalizers that compose characters.
    """
    if context is None:
        return None
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    return 2 * context * max(longest, 1)


def _check_encodable(rows: list[Row]) -> None:
    for row, value in enumerate(rows):
        texts = [value] if isinstance(value, str) else [m["content"] for m in value]
        if found := next(filter(None, map(_LONE_SURROGATE.search, texts)), None):
            raise MlflowException.invalid_parameter_value(
                f"prompt at row {row} is not valid Unicode: it holds the lone surrogate "
                f"{found.group()!r} at character {found.start()}; send UTF-8 text"
            )


def _warn_if_remote_code(config: LoggedConfig, snapshot: Path) -> None:
    if config.trust_remote_code:
        warnings.warn(
            f"model {config.model!r} was logged with trust_remote_code=True: loading it may run "
            f"Python code shipped in its snapshot ({snapshot}). Load it only if you trust that code.",
            RemoteCodeWarning,
            stacklevel=3,
        )


class RemoteCodeWarning(UserWarning):
    """A model logged with ``trust_remote_code=True`` is being loaded."""


def _output(completions: list[Completion], usage: bool) -> pd.DataFrame:
    columns = {OUTPUT_COLUMN: [c.text for c in completions]}
    if usage:
        columns.update({name: [getattr(c, name) for c in completions] for name in USAGE_COLUMNS})
    return pd.DataFrame(columns)
