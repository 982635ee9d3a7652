"""The params stage: a request's inference params and template variables, validated, and the
MLflow ``ParamSchema`` derived from them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, get_args

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.types.schema import AnyType, Map, Object, ParamSchema, ParamSpec, Property
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from templated_llm.errors import TemplateError
from templated_llm.runtime.structured import ResponseFormat


_GREEDY_BELOW = 1e-5


class GenerationParams(BaseModel):
    """What a caller may pass as ``params`` to ``predict``."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 (or below 1e-5) means greedy decoding")
    max_tokens: int = Field(256, ge=1, description="most new tokens per prompt")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="sample among the k likeliest tokens; 0 disables")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, max_length=16, description="stop strings")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="seed for repeatable sampling")
    return_usage: bool = Field(
        False, description="add prompt_tokens, completion_tokens and finish_reason columns"
    )
    response_format: ResponseFormat = Field(
        default_factory=ResponseFormat,
        description="OpenAI's response_format: text, json_object or json_schema (structured output)",
    )

    @property
    def greedy(self) -> bool:
        # Dividing logits by a temperature near 0 overflows to inf: below the cut-off, decode
        # greedily (vLLM's cut-off too).
        return self.temperature < _GREEDY_BELOW


_MLFLOW_TYPES = {"temperature": "double", "top_p": "double", "repetition_penalty": "double",
                 "max_tokens": "long", "top_k": "long", "seed": "long", "stop": "string",
                 "return_usage": "boolean",
                 # An object, as OpenAI clients send it; the schema inside is any JSON object.
                 "response_format": Object([Property("type", "string"),
                                            Property("json_schema", Map(AnyType()), required=False)])}


def param_schema(defaults: dict[str, Any], template_variables: dict[str, str] | None = None) -> ParamSchema:
    """The ParamSchema of a logged model: one ParamSpec per inference param, and one string
    param per template variable (MLflow drops params its schema does not list)."""
    values = GenerationParams(**defaults)
    clashing = sorted(set(template_variables or {}) & set(GenerationParams.model_fields))
    if clashing:
        raise TemplateError(
            f"template variables {clashing} have the names of inference params; rename them "
            f"(inference params: {list(GenerationParams.model_fields)})"
        )
    # max_tokens has no default in the schema: MLflow fills a schema default in before predict,
    # and a caller who sent none gets the model's default or what the context leaves.
    defaults = {**values.model_dump(), "response_format": values.response_format.dump(), "max_tokens": None}
    return ParamSchema([
        *(ParamSpec(name, _MLFLOW_TYPES[name], defaults[name], (-1,) if name == "stop" else None)
          for name in GenerationParams.model_fields),
        *(ParamSpec(name, "string", default) for name, default in (template_variables or {}).items()),
    ])


def split_template_variables(
    params: dict[str, Any] | None, names: Iterable[str]
) -> tuple[dict[str, str], dict[str, Any]]:
    """Separate a request's template variables (strings) from its inference params."""
    names = set(names)
    variables, rest = {}, {}
    for key, value in (params or {}).items():
        if key not in names:
            rest[key] = value
        elif isinstance(value, str):
            variables[key] = value
        elif value is not None:
            raise MlflowException.invalid_parameter_value(
                f"param {key!r} is a template variable and must be a string; received {value!r}"
            )
    return variables, rest


def _plain(value: Any) -> Any:
    # MLflow hands over numpy scalars and arrays; pydantic wants Python values.
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_params(
    params: dict[str, Any] | None, template_variables: Iterable[str], defaults: dict[str, Any],
    max_tokens_limit: int,
) -> tuple[dict[str, str], GenerationParams]:
    """A request's params: its template variables, and its inference params validated over
    ``defaults`` with ``max_tokens`` within the limit logged with the model."""
    variables, rest = split_template_variables(params, template_variables)
    return variables, validate_params(rest, defaults, max_tokens_limit)


def _fields_at(model: type[BaseModel], path: list[Any]) -> list[str]:
    """The fields of the pydantic model found by following ``path`` from ``model``."""
    for key in path:
        field = model.model_fields.get(str(key))
        found = [a for a in (field.annotation, *get_args(field.annotation)) if isinstance(a, type)
                 and issubclass(a, BaseModel)] if field is not None else []
        if not found:
            return []
        model = found[0]
    return [field.alias or name for name, field in model.model_fields.items()]


def validate_params(
    params: dict[str, Any] | None, defaults: dict[str, Any], max_tokens_limit: int | None = None
) -> GenerationParams:
    """Merge ``params`` over ``defaults`` and validate them.

    Raises ``MlflowException`` with ``INVALID_PARAMETER_VALUE`` (HTTP 400 when served) naming
    every bad param, the value received and what is allowed.
    """
    merged = {**defaults, **{k: _plain(v) for k, v in (params or {}).items() if v is not None}}
    try:
        generation = GenerationParams(**merged)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name, *item = error["loc"]
            if error["type"] == "extra_forbidden" and not item:
                problems.append(
                    f"unknown param {name!r}; allowed params: {list(GenerationParams.model_fields)}"
                )
            elif error["type"] == "extra_forbidden":
                fields = _fields_at(GenerationParams, [name, *item[:-1]])
                problems.append(
                    f"param {name!r} has no field {'.'.join(map(str, item))!r}"
                    f"{f'; it takes {fields}' if fields else ''}; received {merged[name]!r}"
                )
            else:
                where = f" item {item[0]}" if item and isinstance(item[0], int) else (
                    f" field {'.'.join(map(str, item))}" if item else "")
                problems.append(
                    f"param {name!r}{where}: {error['msg']}; received {merged[name]!r}"
                )
        raise MlflowException.invalid_parameter_value("; ".join(problems)) from None
    if max_tokens_limit is not None and generation.max_tokens > max_tokens_limit:
        raise MlflowException.invalid_parameter_value(
            f"param 'max_tokens': at most {max_tokens_limit} for this model (max_tokens_limit, "
            f"set when it was logged); received {generation.max_tokens}"
        )
    return generation
