"""The Llama-2-chat plugin for templated-llm: meta-llama/Llama-2-*-chat-hf.

Llama is native to transformers, so the core's generic hooks load it; the plugin declares the
model, its ``[INST]``/``<<SYS>>`` template, chat support and the system prompt variable.
"""

from __future__ import annotations

from templated_llm import ModelSpec, hookimpl

MODEL_NAME = "llama2-chat"


@hookimpl
def register_models(register):
    register(
        ModelSpec(
            name=MODEL_NAME,
            repo_id="meta-llama/Llama-2-7b-chat-hf",
            template="llama2-chat.jinja",
            generation_defaults={"temperature": 0.6, "top_p": 0.9, "max_tokens": 256},
            chat=True,
            # Meta's reference code no longer sets a default system prompt; empty leaves out
            # the <<SYS>> block.
            template_variables={"system": ""},
            description="Llama 2 chat, [INST] turns with a <<SYS>> system prompt",
        )
    )
