"""The Dolly v2 plugin for templated-llm: databricks/dolly-v2-3b, -7b and -12b.

Dolly is a GPT-NeoX model, loaded by the core's generic hooks; what differs is its prompt (an
intro line, ``### Instruction:``, an optional ``Input:`` context, ``### Response:``) and its end
of answer: the special token ``### End``, which the plugin adds to the model's end tokens, and
the answer stripped of the whitespace around it, as databricks' own pipeline does.
"""

from __future__ import annotations

from typing import Any

from templated_llm import ModelSpec, hookimpl

MODEL_NAME = "dolly-v2"
END_KEY = "### End"


@hookimpl
def register_models(register):
    register(
        ModelSpec(
            name=MODEL_NAME,
            repo_id="databricks/dolly-v2-3b",
            template="dolly-v2.jinja",
            generation_defaults={"temperature": 0.0, "max_tokens": 256},
            chat_as_instruction=True,
            # The optional context of a closed-QA or summarisation instruction.
            template_variables={"context": ""},
            # Answers end with a blank line before ### End; databricks' pipeline strips them.
            strip_output=True,
            description="Dolly v2, instruction-tuned GPT-NeoX, '### Instruction' format",
        )
    )


@hookimpl
def prepare_model(spec: ModelSpec, model: Any, tokenizer: Any) -> None:
    if spec.name != MODEL_NAME:
        return
    end = tokenizer.get_added_vocab().get(END_KEY)
    config = model.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else model.config.eos_token_id
    eos = list(eos) if isinstance(eos, list) else [eos] if eos is not None else []
    if end is not None and end not in eos:
        config.eos_token_id = [*eos, end]
