"""The Mistral-instruct plugin for templated-llm: mistralai/Mistral-7B-Instruct-v0.*.

Mistral is native to transformers, so the core's generic hooks load it (with its sliding-window
attention); the plugin declares the model, its ``[INST]`` template and chat support.
"""

from __future__ import annotations

from templated_llm import ModelSpec, hookimpl

MODEL_NAME = "mistral-instruct"


@hookimpl
def register_models(register):
    register(
        ModelSpec(
            name=MODEL_NAME,
            repo_id="mistralai/Mistral-7B-Instruct-v0.2",
            template="mistral-instruct.jinja",
            generation_defaults={"temperature": 0.7, "max_tokens": 256},
            chat=True,
            template_variables={"system": ""},
            description="Mistral 7B instruct, [INST] turns; a system prompt opens the first",
        )
    )
