"""The configuration a logged model carries (MLflow's ``model_config``), shared by log and load."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from templated_llm.engine.config import DEFAULT_MAX_WAITING, DEFAULT_PREFILL_CHUNK, EngineConfig, PrefillOrder
from templated_llm.errors import ConfigError, validation_summary
from templated_llm.runtime.tasks import Task

DType = Literal["auto", "float32", "bfloat16", "float16"]

# Request limits a logged model enforces unless log_llm sets others: enough for interactive and
# moderate batch use, small enough that one request cannot hold a server for long.
DEFAULT_MAX_ROWS_PER_REQUEST = 64
DEFAULT_MAX_TOKENS_LIMIT = 1024


class LoggedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    plugin: str
    plugin_module: str
    # The digest of the plugin code the model carries (plugins/plugin_code.py); None in models
    # logged before it was recorded, and for templated-llm's own plugin.
    plugin_digest: str | None = None
    attention: str = "auto"
    dtype: DType = "auto"  # auto: the checkpoint's dtype where the device computes it natively
    device: str | None = None  # None: CUDA when present, else CPU
    generation_defaults: dict[str, Any] = {}
    templated_llm_version: str = ""
    # The user's opt-in to run Python code shipped in the snapshot (see docs/security.md).
    trust_remote_code: bool = False
    max_rows_per_request: int = Field(DEFAULT_MAX_ROWS_PER_REQUEST, ge=1)
    max_tokens_limit: int = Field(DEFAULT_MAX_TOKENS_LIMIT, ge=1)
    # On CPU, reorder linear weights once for oneDNN at load (see packed_linear.py).
    pack_weights: bool = True
    # The continuous-batching engine (templated_llm.engine); False generates whole batches with
    # transformers' generate. None budget fields are sized at load from the model and free memory;
    # all of them can be overridden at load: load_model(uri, model_config={"max_num_seqs": 8}).
    engine: bool = True
    max_num_seqs: int | None = Field(None, ge=1)
    max_cache_tokens: int | None = Field(None, ge=1)
    max_waiting: int = Field(DEFAULT_MAX_WAITING, ge=1)
    prefill_chunk: int = Field(DEFAULT_PREFILL_CHUNK, ge=1)
    prefill_order: PrefillOrder = "shortest"

    def engine_config(self) -> EngineConfig:
        return EngineConfig(self.max_num_seqs, self.max_cache_tokens, self.max_waiting,
                            self.prefill_chunk, self.prefill_order)
    # MLflow's LLM task the model was logged with (its request and response shapes); None is
    # the 'prompt'/'candidates' schema.
    task: Task | None = None
    # Traces of requests (see runtime/tracing.py), and whether they hold prompt and completion text.
    tracing: bool = True
    trace_content: bool = True
    # Which template the model renders with: its file (or prompt) name, and its version.
    template_name: str = ""
    template_version: str = ""
    # The prompt registry version the template came from ("prompts:/name/3"), if it did.
    template_uri: str | None = None

    @model_validator(mode="after")
    def _default_max_tokens_within_limit(self) -> LoggedConfig:
        # A limit below the default max_tokens (the plugin's, or the logged one under a lower
        # limit given at load) brings the default down with it.
        default = self.generation_defaults.get("max_tokens")
        if isinstance(default, int) and default > self.max_tokens_limit:
            self.generation_defaults = {**self.generation_defaults, "max_tokens": self.max_tokens_limit}
        return self


def read_config(fields: dict[str, Any], where: str) -> LoggedConfig:
    """``fields`` as a LoggedConfig, or a ConfigError naming each bad setting, what is wrong with
    it and the value received; ``where`` says who gave them (``log_llm``, ``model_config``)."""
    try:
        return LoggedConfig.model_validate(fields)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {validation_summary(exc)}") from exc

