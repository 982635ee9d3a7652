"""The generic chat plugin for templated-llm: any instruct model whose tokenizer carries a chat
template (``tokenizer.chat_template``), rendered through that template.

Log it with the snapshot of the model to serve: ``log_llm("hf-chat", snapshot=...)``. Without
a snapshot it downloads Zephyr 7B beta.
"""

from __future__ import annotations

from templated_llm import ModelSpec, hookimpl

MODEL_NAME = "hf-chat"


@hookimpl
def register_models(register):
    register(
        ModelSpec(
            name=MODEL_NAME,
            repo_id="HuggingFaceH4/zephyr-7b-beta",
            template="hf-chat.jinja",
            generation_defaults={"temperature": 0.7, "max_tokens": 256},
            chat=True,
            tokenizer_chat_template=True,
            template_variables={"system": ""},
            description="any chat model, through its tokenizer's own chat template",
        )
    )
