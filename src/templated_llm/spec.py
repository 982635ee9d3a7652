"""What a plugin declares about a model it serves."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Variables every template receives from the core; a spec cannot declare them.
CORE_TEMPLATE_VARIABLES = ("prompt", "messages")


class ModelSpec(BaseModel):
    """A model a plugin can log and serve.

    ``name`` is what users pass to :func:`templated_llm.log_llm`; ``repo_id`` is the Hugging Face
    repository downloaded when no local snapshot is given; ``template`` names a file in the
    shipped ``prompt_templates/`` folder (which a same-named file in the working directory never
    replaces), or is a path to a Jinja file.

    ``chat`` declares that the template renders OpenAI-style ``messages`` (the variable
    ``messages``: user and assistant turns, the last the user's), so the model takes ``messages``
    input; ``tokenizer_chat_template`` renders the conversation with the tokenizer's own chat
    template instead, the Jinja template then rendering only the user's last turn.
    ``chat_as_instruction`` declares that an instruction model without a chat format takes a
    single-turn chat (one user message after an optional system message) as its instruction,
    as OpenAI-style chat clients send it to the ``templated-llm serve`` server.
    ``template_variables`` are the template's further variables (``system`` for a system prompt,
    or any other) with their defaults; each is also a request param of the same name.
    ``strip_output`` trims whitespace around each generated text, streamed or not, as the model
    family's own pipeline does (Dolly's answers end with a blank line before ``### End``).
    ``model_types``: the ``model_type`` values (config.json) of the snapshots the plugin's loader
    can load, for a plugin that loads one model class; empty (any) when it loads through
    ``AutoModelForCausalLM``. Another snapshot is refused at log time.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    repo_id: str = Field(min_length=1)
    revision: str | None = None
    template: str = Field(min_length=1)
    generation_defaults: dict[str, Any] = Field(default_factory=dict)
    pip_requirements: tuple[str, ...] = ()
    description: str = ""
    chat: bool = False
    tokenizer_chat_template: bool = False
    chat_as_instruction: bool = False
    template_variables: dict[str, str] = Field(default_factory=dict)
    strip_output: bool = False
    model_types: tuple[str, ...] = ()
    # Filled in by the plugin manager: which plugin declared the spec and in which module it lives.
    plugin_name: str = ""
    plugin_module: str = ""

    @field_validator("template_variables")
    @classmethod
    def _variable_names(cls, variables: dict[str, str]) -> dict[str, str]:
        for name in variables:
            if not name.isidentifier() or name in CORE_TEMPLATE_VARIABLES:
                raise ValueError(
                    f"template variable {name!r} must be a Python identifier other than "
                    f"{list(CORE_TEMPLATE_VARIABLES)}"
                )
        return variables

    @model_validator(mode="after")
    def _chat_flags_agree(self) -> ModelSpec:
        if self.tokenizer_chat_template and not self.chat:
            raise ValueError("tokenizer_chat_template=True renders messages: set chat=True too")
        if self.chat_as_instruction and self.chat:
            raise ValueError("chat_as_instruction is for models without a chat format: set chat=False")
        return self
