"""From a request row (a prompt or a chat conversation) to the exact text the model sees."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from templated_llm.errors import TemplateError
from templated_llm.runtime.inputs import Message
from templated_llm.spec import ModelSpec
from templated_llm.runtime.templates import PromptTemplate

#: A request row: a prompt string, or an OpenAI-style list of chat messages.
Row = str | list[Message]


class PromptRenderer:
    """Renders rows for one model, as its spec says: through its Jinja template, or through the
    tokenizer's own chat template (the Jinja template then renders the user's last turn).

    Template variables (``system`` and the spec's others) take the spec's defaults unless a
    request overrides them; a conversation's leading ``system`` message sets ``system``.
    """

    def __init__(self, spec: ModelSpec, template: PromptTemplate, tokenizer: Any) -> None:
        if spec.tokenizer_chat_template and not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"model {spec.name!r} renders prompts with the tokenizer's chat template, but "
                "this snapshot's tokenizer has none (no chat_template in tokenizer_config.json "
                "or chat_template.jinja); use a chat model's snapshot or another plugin"
            )
        self.spec = spec
        self.template = template
        self.tokenizer = tokenizer

    @property
    def add_special_tokens(self) -> bool:
        """Whether tokenizing the rendered text adds the tokenizer's special tokens (its bos).

        A tokenizer's chat template writes those itself, so they are not added twice.
        """
        return not self.spec.tokenizer_chat_template

    def render(self, row: Row, variables: dict[str, str] | None = None) -> str:
        values = {**self.spec.template_variables, **(variables or {})}
        if isinstance(row, str):
            turns: list[Message] = [{"role": "user", "content": row}]
        else:
            turns = self._chat_turns(row, values)
        prompt = turns[-1]["content"]
        if not self.spec.tokenizer_chat_template:
            return self.template.render(prompt, messages=turns, **values)
        system = values.pop("system", "")
        last = {"role": "user", "content": self.template.render(prompt, messages=turns, **values)}
        conversation = ([{"role": "system", "content": system}] if system else []) + turns[:-1] + [last]
        try:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the model's own template refusing, e.g. a system role
            raise MlflowException.invalid_parameter_value(
                f"the chat template of model {self.spec.name!r} rejected the conversation: {exc}"
            ) from exc

    def _chat_turns(self, conversation: list[Message], values: dict[str, str]) -> list[Message]:
        if not self.spec.chat:
            raise MlflowException.invalid_parameter_value(
                f"model {self.spec.name!r} does not take chat 'messages'; send a 'prompt' column "
                "(or a list of prompt strings) instead"
            )
        if conversation[0]["role"] != "system":
            return conversation
        if "system" not in self.spec.template_variables:
            raise MlflowException.invalid_parameter_value(
                f"model {self.spec.name!r} takes no system prompt; remove the 'system' message"
            )
        values["system"] = conversation[0]["content"]
        return conversation[1:]


def render_prompt(
    model: str,
    row: Row,
    *,
    variables: dict[str, str] | None = None,
    template: str | os.PathLike[str] | None = None,
    snapshot: str | os.PathLike[str] | None = None,
) -> str:
    """The exact prompt model ``model`` sees for ``row``, without loading any weights.

    With a local ``snapshot`` the text is what its tokenizer reads, special tokens it adds (a
    ``<s>``) included; without one, the template's output. Models rendered by their tokenizer's
    chat template need the snapshot.
    """
    from templated_llm.runtime.generation import prepare_tokenizer
    from templated_llm.plugins.manager import call_first, get_model_spec
    from templated_llm.runtime.templates import find_template

    spec = get_model_spec(model)
    unknown = sorted(set(variables or {}) - set(spec.template_variables))
    if unknown:
        raise TemplateError(
            f"model {model!r} has no template variables {unknown}; its variables: "
            f"{sorted(spec.template_variables) or 'none'}"
        )
    path = find_template(template) if template is not None else call_first("prompt_template", spec=spec)
    tokenizer = None
    if snapshot is not None:
        tokenizer = prepare_tokenizer(call_first(
            "load_tokenizer", spec=spec, snapshot=Path(snapshot), trust_remote_code=False
        ))
    elif spec.tokenizer_chat_template:
        raise TemplateError(
            f"model {model!r} renders prompts with its tokenizer's chat template; pass the "
            "snapshot whose tokenizer to use"
        )
    renderer = PromptRenderer(spec, PromptTemplate.from_file(path), tokenizer)
    text = renderer.render(row, variables)
    if tokenizer is None:
        return text
    ids = tokenizer(text, add_special_tokens=renderer.add_special_tokens).input_ids
    return tokenizer.decode(ids)
