"""What a plugin declares about a model it serves."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelSpec(BaseModel):
    """A model a plugin can log and serve.

    ``name`` is what users pass to :func:`templated_llm.log_llm`; ``repo_id`` is the Hugging Face
    repository downloaded when no local snapshot is given; ``template`` names a file in the
    shipped ``prompt_templates/`` folder (or is a path to a Jinja file).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    repo_id: str = Field(min_length=1)
    revision: str | None = None
    template: str = Field(min_length=1)
    generation_defaults: dict[str, Any] = Field(default_factory=dict)
    pip_requirements: tuple[str, ...] = ()
    description: str = ""
    # Filled in by the plugin manager: which plugin declared the spec and in which module it lives.
    plugin_name: str = ""
    plugin_module: str = ""
