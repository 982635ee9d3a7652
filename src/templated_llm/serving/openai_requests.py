"""OpenAI request bodies: parsed, checked, and turned into the rows and params ``predict`` takes.

Every problem is a :class:`~templated_llm.errors.RequestError` (HTTP 400) naming the field, the
value received and what is allowed. Fields that would change the output but are not supported
(``logprobs``, ``tools``, ...) are refused by name; fields that change nothing (``user``,
``metadata``, ...) are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from templated_llm.errors import RequestError
from templated_llm.runtime.inputs import Row, openai_role, system_prompt_twice
from templated_llm.spec import ModelSpec

# Fields that change nothing here: accepted and ignored.
_HARMLESS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
             "prompt_cache_retention", "prompt_cache_options", "safety_identifier")


def _off(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or any(value == v and type(value) is type(v) for v in values)


# Fields that would change the output and are not supported, with the values that change nothing.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "logprobs": _off(False), "top_logprobs": _off(0), "logit_bias": _off({}), "tools": _off([]),
    "tool_choice": _off("none"), "functions": _off([]), "function_call": _off("none"),
    "frequency_penalty": _off(0, 0.0), "presence_penalty": _off(0, 0.0),
    "modalities": _off(["text"]), "audio": _off(),
    "prediction": _off(), "reasoning_effort": _off(), "web_search_options": _off(),
    "verbosity": _off(), "moderation": _off(), "echo": _off(False), "suffix": _off(""), "best_of": _off(1),
}


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    include_obfuscation: bool = False  # OpenAI's padding against length side channels: none here


class _Request(BaseModel):
    """The fields both routes take; OpenAI's ranges, then the model's own limits at generation."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI's range: any int64
    stream: bool = False
    stream_options: _StreamOptions | None = None
    # Extensions: sampling params predict takes, and the template's variables.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = None
    template_variables: dict[str, str] | None = None
    # Structured output: checked (a 400 naming the problem) by predict's params.
    response_format: dict[str, Any] | None = None

    @field_validator("n", "stream", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: Any, info: ValidationInfo) -> Any:
        # OpenAI's clients send null for an unset optional field.
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stream_options")
    @classmethod
    def _with_stream(cls, options: _StreamOptions | None, info: ValidationInfo) -> _StreamOptions | None:
        if options is not None and not info.data.get("stream"):  # declared before it
            raise ValueError("'stream_options' is only allowed with 'stream': true")
        return options

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class _RefusalPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["refusal"]
    refusal: str


def _part_model(part: Any) -> str | None:
    # The model's name is the union tag pydantic puts in an error's location (see _model_at).
    return {"text": "_TextPart", "refusal": "_RefusalPart"}.get(part.get("type")) if isinstance(part, dict) else None


_Part = Annotated[Annotated[_TextPart, Tag("_TextPart")] | Annotated[_RefusalPart, Tag("_RefusalPart")],
                  Discriminator(_part_model, custom_error_type="content_part",
                                custom_error_message="a content part is {'type': 'text', 'text': ...}"
                                                     " (or, from an assistant, {'type': 'refusal', ...})")]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part] | None = None
    name: str | None = None  # accepted; no template shows it
    # An assistant message goes back as the API returned it, with these fields (the openai
    # client's `messages.append(response.choices[0].message)`). Empty, they change nothing;
    # a refusal is what the assistant said.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any = None
    function_call: Any = None
    tool_calls: Any = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if isinstance(content, list) and any(
                isinstance(p, dict) and p.get("type") not in ("text", "refusal", None) for p in content):
            raise ValueError(
                f"only text content parts are supported; received part types "
                f"{[p.get('type') for p in content if isinstance(p, dict)]}"
            )
        return content

    @field_validator("audio", "function_call", "tool_calls")
    @classmethod
    def _empty(cls, value: Any) -> Any:
        if value not in (None, []):
            raise ValueError("this server supports no tool calls or audio: send null")
        return value

    @model_validator(mode="after")
    def _has_content(self) -> _Message:
        if self.role == "assistant":
            return self
        if self.content is None:
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.content == []:
            raise ValueError(f"a {self.role} message's content is an empty list; send at least one text part")
        parts = self.content if isinstance(self.content, list) else []
        if self.refusal is not None or any(isinstance(p, _RefusalPart) for p in parts):
            raise ValueError(f"a refusal is an assistant's; a {self.role} message has text only")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, _TextPart) else p.refusal for p in self.content)


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str]

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("send at least one prompt")
        if isinstance(prompt, list) and any(isinstance(p, int | list) for p in prompt):
            raise ValueError("prompts of token ids are not supported; send text")
        return prompt

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


def parse(kind: type[_Request], body: bytes) -> Any:
    """The request of type ``kind`` in ``body``, or a RequestError saying what is wrong with it."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"the body is not valid JSON: {_short(exc)}") from None
    if not isinstance(document, dict):
        raise RequestError(f"the body must be a JSON object; received {type(document).__name__}")
    for name, value in document.items():
        if name in _UNSUPPORTED and not _UNSUPPORTED[name](value):
            raise RequestError(f"{name!r} is not supported by this server; received {_short(value)}. "
                               "Remove it or send its default", param=name, code="unsupported_parameter")
    fields = {k: v for k, v in document.items() if k not in _UNSUPPORTED and k not in _HARMLESS}
    try:
        return kind.model_validate(fields)
    except ValidationError as exc:
        raise _invalid(exc, kind) from None


def _invalid(exc: ValidationError, kind: type[_Request]) -> RequestError:
    problems, params = [], []
    for error in exc.errors(include_url=False):
        loc = [part for part in error["loc"] if not _union_member(part)]
        param = ".".join(map(str, loc))
        params.append(param)
        if error["type"] == "extra_forbidden":
            if len(loc) == 1:
                allowed = sorted({*kind.model_fields, *_HARMLESS})
                problems.append(f"unrecognized request argument {param!r}; this server takes {allowed}")
            else:
                allowed = sorted(_model_at(kind, error["loc"][:-1]).model_fields)
                problems.append(f"unrecognized field {param!r}; it takes {allowed}")
        elif error["type"] == "missing":
            problems.append(f"param {param!r} is required")
        else:
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"param {param!r}: {message}; received {_short(error['input'])}")
    return RequestError("; ".join(dict.fromkeys(problems)), param=params[0])


def _union_member(part: str | int) -> bool:
    # pydantic names the member of a union it tried in the error's location: a type, never a
    # field name (fields are lowercase words; the models here are private).
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none")
                                      or part.startswith(("list[", "dict[", "function-", "_")))


def _model_at(kind: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel]:
    """The model whose fields pydantic's error location ``loc`` points into."""
    model, candidates = kind, [kind]
    for part in loc:
        named = [m for m in candidates if m.__name__ == part]  # the union member pydantic tried
        if named:
            model = named[0]
        elif isinstance(part, str) and part in model.model_fields:
            candidates = _models_in(model.model_fields[part].annotation) or candidates
            model = candidates[0]
    return model


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def params(request: _Request, spec: ModelSpec, variables: dict[str, str] | None = None) -> dict[str, Any]:
    """``predict``'s params for ``request``: the sampling fields sent, and the template variables."""
    template_variables = request.template_variables or {}
    unknown = sorted(set(template_variables) - set(spec.template_variables))
    if unknown:
        raise RequestError(
            f"model {spec.name!r} has no template variables {unknown}; its variables: "
            f"{sorted(spec.template_variables) or 'none'}", param="template_variables")
    completion_tokens = getattr(request, "max_completion_tokens", None)
    if completion_tokens is not None and request.max_tokens not in (None, completion_tokens):
        raise RequestError(
            f"max_tokens ({request.max_tokens}) and max_completion_tokens ({completion_tokens}) differ; "
            "send one of them (max_completion_tokens is OpenAI's current name)", param="max_completion_tokens")
    max_tokens = request.max_tokens if completion_tokens is None else completion_tokens
    sampling = {"temperature": request.temperature, "top_p": request.top_p, "max_tokens": max_tokens,
                "stop": [request.stop] if isinstance(request.stop, str) else request.stop,
                "seed": request.seed, "top_k": request.top_k,
                "repetition_penalty": request.repetition_penalty,
                "response_format": request.response_format}
    return {**{k: v for k, v in sampling.items() if v is not None},
            **template_variables, **(variables or {})}


def chat_row(request: ChatRequest, spec: ModelSpec) -> tuple[Row, dict[str, str]]:
    """The row ``predict`` takes for a chat, and the template variables its messages set.

    A chat model takes the conversation. An instruction model declared ``chat_as_instruction``
    takes one user message as its instruction; a system message before it sets the ``system``
    variable, or, for a template without one, opens the instruction.
    """
    turns = [{"role": openai_role(m.role), "content": m.text}
             for m in request.messages]
    if problem := system_prompt_twice(turns, request.template_variables or {}, spec.template_variables,
                                      "template_variables.system"):
        raise RequestError(problem, param="template_variables")
    if spec.chat:
        return turns, {}
    if not spec.chat_as_instruction:
        raise RequestError(
            f"model {spec.name!r} has no chat format and takes no chat messages; send its prompt "
            "to /v1/completions instead", param="messages")
    roles = [t["role"] for t in turns]
    if roles not in (["user"], ["system", "user"]):
        raise RequestError(
            f"model {spec.name!r} is an instruction model without a chat format: it takes one user "
            "message, after an optional system message, as its instruction, and cannot be shown "
            f"earlier turns; received messages with roles {roles}. Send one user message", param="messages")
    instruction = turns[-1]["content"]
    if len(turns) == 1:
        return instruction, {}
    system = turns[0]["content"]
    if "system" in spec.template_variables:
        return instruction, {"system": system}
    return f"{system}\n\n{instruction}" if system else instruction, {}
