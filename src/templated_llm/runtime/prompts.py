"""The prompts stage: a request row (a prompt or a chat conversation) to the exact text the model
sees, through the model's Jinja template or its tokenizer's chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from templated_llm.errors import TemplateError
from templated_llm.runtime.inputs import Message, Row, system_prompt_twice
from templated_llm.runtime.templates import PromptTemplate
from templated_llm.spec import ModelSpec


def check_chat_template(spec: ModelSpec, tokenizer: Any, snapshot: Path | None = None) -> None:
    """Refuse a tokenizer without a chat template for a model rendered by its tokenizer's
    (``spec.tokenizer_chat_template``); ``snapshot``, if given, is where it was loaded from."""
    if spec.tokenizer_chat_template and not getattr(tokenizer, "chat_template", None):
        source = f"snapshot {snapshot}" if snapshot is not None else "this snapshot"
        raise TemplateError(
            f"model {spec.name!r} renders prompts with the tokenizer's own chat template, but the "
            f"tokenizer of {source} has no chat_template (none in tokenizer_config.json, no "
            "chat_template.jinja), so there is no format to render conversations in. Log it with a "
            "plugin made for this model, whose prompt template writes its format (`templated-llm "
            "new-plugin` writes one), or add the model's chat template to the snapshot as "
            "chat_template.jinja"
        )


class PromptRenderer:
    """Renders rows for one model, as its spec says: through its Jinja template, or through the
    tokenizer's own chat template (the Jinja template then renders the user's last turn).

    Template variables (``system`` and the spec's others) take the spec's defaults unless a
    request overrides them; a conversation's leading ``system`` message sets ``system``.
    """

    def __init__(self, spec: ModelSpec, template: PromptTemplate, tokenizer: Any) -> None:
        check_chat_template(spec, tokenizer)
        self.spec = spec
        self.template = template
        self.tokenizer = tokenizer

    def render(self, row: Row, variables: dict[str, str] | None = None) -> str:
        """The text the model sees for ``row``; ``variables`` override the template variables'
        defaults. Raises ``MlflowException`` (HTTP 400) for a conversation the model cannot take,
        or one whose system message ``variables`` sets again."""
        if problem := system_prompt_twice(row, variables or {}, self.spec.template_variables, "the 'system' param"):
            raise MlflowException.invalid_parameter_value(problem)
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
        rest = [*turns[:-1], last]
        try:
            # The content as sent (a plain str): the model's template decides what an empty one renders.
            return self._chat_template(([{"role": "system", "content": str(system)}] if system else []) + rest)
        except MlflowException:
            # A system message sent empty says nothing: a template without a system role
            # (Gemma's) renders the conversation without it rather than refusing it.
            sent_empty = isinstance(system, SentSystemPrompt) and not str(system)
            if not sent_empty:
                raise
            return self._chat_template(rest)

    def _chat_template(self, conversation: list[Message]) -> str:
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
        values["system"] = SentSystemPrompt(conversation[0]["content"])
        return conversation[1:]


class SentSystemPrompt(str):
    """The content of a system message a conversation sent: true even when empty.

    Templates test ``if system``. An empty ``system`` param is no system prompt (MLflow fills
    every param a request leaves out with its default, ""), but a system message sent empty
    still opens its block, as the official templates render it (Llama 2's ``<<SYS>>``, Zephyr's
    ``<|system|>``): the model was trained with that block, empty or not.
    """

    def __bool__(self) -> bool:
        return True

