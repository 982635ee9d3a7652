"""Structured output: OpenAI's ``response_format`` turned into a grammar that allows, at every
step, only the tokens that keep the output valid JSON (``json_object``) or valid against a JSON
schema (``json_schema``), with llguidance.

Compile a response format for a tokenizer once (``StructuredOutput.compile``, cached); each
sequence then gets its own state (``Grammar.start``) that says which tokens it allows next
(``allowed_token_mask``), takes the token sampled (``advance``) and says when the output is
complete (``is_done``: only an end token may follow). Nothing here knows about batches: the
engine's sampler masks each constrained row with its own state (``mask_logits``), the
whole-batch path applies the states through ``GrammarLogitsProcessor``, and rows without a
state stay free.

Two choices make every output end: objects a schema leaves open (no ``additionalProperties``)
are closed, as OpenAI's strict mode does, so the output still validates against the schema as
sent; and JSON is written compactly, so no sequence can spend its tokens on whitespace.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Literal

import llguidance
import llguidance.hf
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from transformers import LogitsProcessor

#: How many compiled response formats a loaded model keeps.
CACHE_SIZE = 128
_COMPILE_OPTIONS = {"whitespace_flexible": False}
#: How deeply a schema document may nest JSON objects and arrays (a schema level with its
#: "properties" takes two). Deeper ones are refused up front: the JSON encoder (from about 300)
#: and the compiler would otherwise fail on them with errors a client cannot read.
MAX_SCHEMA_DEPTH = 128


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``, as OpenAI's API takes it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _not_too_deep(cls, schema: dict[str, Any]) -> dict[str, Any]:
        depth = _depth(schema)
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema document nests JSON objects and arrays {depth} levels "
                             f"deep; at most {MAX_SCHEMA_DEPTH} are allowed")
        return schema


def _depth(value: Any) -> int:
    """How deeply ``value`` nests dicts and lists (iterative: any depth, no recursion)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return deepest


class ResponseFormat(BaseModel):
    """The ``response_format`` param: ``text`` (free), ``json_object`` or ``json_schema``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' is required with type 'json_schema' and only with it")
        return self

    @property
    def constrained(self) -> bool:
        return self.type != "text"

    def schema(self) -> dict[str, Any]:
        """The JSON schema the output must satisfy (any object for ``json_object``)."""
        return self.json_schema.schema_ if self.json_schema is not None else {"type": "object"}

    def dump(self) -> dict[str, Any]:
        """As the request sent it (``schema``, not ``schema_``), without unset fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# Where a JSON schema holds schemas: keyword -> a schema, a list of them, or a name -> schema map.
# Other keywords' values (const, enum, default, examples, required...) are data, never changed.
_SUBSCHEMA = {"items": "one", "additionalProperties": "one", "not": "one", "if": "one", "then": "one",
              "else": "one", "contains": "one", "propertyNames": "one", "additionalItems": "one",
              "unevaluatedProperties": "one", "unevaluatedItems": "one",
              "anyOf": "list", "oneOf": "list", "allOf": "list", "prefixItems": "list",
              "properties": "map", "patternProperties": "map", "$defs": "map", "definitions": "map",
              "dependentSchemas": "map"}


def _closed(schema: Any, close: bool = True) -> Any:
    """``schema`` with every object schema that leaves ``additionalProperties`` unset closed,
    so a model writes no keys the schema does not name. Not where ``allOf`` composes an object
    from several schemas: closed, each would refuse the others' properties."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    # allOf branches, and the object beside them, describe one object together: left open.
    close = close and "allOf" not in schema
    for key, shape in _SUBSCHEMA.items():
        value = schema.get(key)
        if shape == "map" and isinstance(value, dict):
            closed[key] = {name: _closed(sub) for name, sub in value.items()}
        elif isinstance(value, list) and shape in ("list", "one"):  # "items" as a list: draft 4
            closed[key] = [_closed(sub, close=key != "allOf") for sub in value]
        elif isinstance(value, dict) and shape == "one":
            closed[key] = _closed(value)
    if close and "properties" in schema and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


class GrammarState:
    """One sequence's place in a grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size

    def allowed_token_mask(self) -> torch.Tensor:
        """A boolean tensor over the vocabulary (on the CPU): the tokens allowed next."""
        # One bit per token, little-endian in 32-bit words, from llguidance.
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8),
                             bitorder="little", count=self._vocab_size)
        return torch.from_numpy(bits.view(np.bool_))

    def advance(self, token_id: int) -> None:
        """Take the token sampled; raises ``ValueError`` for one the mask did not allow."""
        if not self._matcher.consume_token(token_id):
            raise ValueError(f"token {token_id} is not allowed here: {self._matcher.get_error()}")

    def is_done(self) -> bool:
        """Whether the output is complete: nothing but an end token may follow."""
        return self._matcher.is_stopped()


class Grammar:
    """A response format compiled for one tokenizer; ``start`` gives each sequence its state."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._prototype = matcher
        self._vocab_size = vocab_size

    def start(self) -> GrammarState:
        return GrammarState(self._prototype.deep_copy(), self._vocab_size)


class StructuredOutput:
    """Compiles response formats for one tokenizer, keeping the last :data:`CACHE_SIZE`.

    ``vocab_size`` is the width of the model's logits (which may exceed the tokenizer's
    vocabulary); ``end_ids`` the tokens that end a sequence. Thread-safe.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, end_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._end_ids = end_ids
        self._ll_tokenizer = None  # built on first use: about a second for a large vocabulary
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, response_format: ResponseFormat) -> Grammar | None:
        """The grammar of ``response_format``; None for ``text``. Raises ``MlflowException``
        (HTTP 400 when served) naming what in the schema cannot be enforced."""
        if not response_format.constrained:
            return None
        key = json.dumps(response_format.dump(), sort_keys=True)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            grammar = self._compile(response_format)
            self._cache[key] = grammar
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return grammar

    def _compile(self, response_format: ResponseFormat) -> Grammar:
        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self._tokenizer, n_vocab=self.vocab_size, eos_token=self._end_ids)
        schema = _closed(response_format.schema())
        where = "json_schema.schema" if response_format.json_schema is not None else "json_object"
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_COMPILE_OPTIONS)
        except ValueError as exc:
            raise _invalid(where, str(exc)) from None
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise _invalid(where, matcher.get_error())
        return Grammar(matcher, self.vocab_size)


def _invalid(where: str, problem: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(
        f"param 'response_format': {where} cannot be enforced: {problem.strip()}"
    )


def mask_logits(scores: torch.Tensor, state: GrammarState, end_ids: list[int]) -> None:
    """Set to ``-inf``, in place, the logits (one row) of every token ``state`` does not allow
    next; once the output is complete, of every token but ``end_ids``. Apply before
    temperature, top-k and top-p, so that they choose among allowed tokens."""
    if state.is_done():
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
        allowed[end_ids] = True
    else:
        allowed = state.allowed_token_mask()
    scores.masked_fill_(~allowed.to(scores.device), -torch.inf)


class GrammarLogitsProcessor(LogitsProcessor):
    """Applies one state per batch row to transformers' ``generate``; ``None`` rows stay free.

    Each call first advances every unfinished state by the token its row took in the step
    before, then masks the row's logits (:func:`mask_logits`). A row that took an end token
    before its grammar was done has finished anyway (``generate`` ended it on a stop string
    and pads it while the others go on): its state is dropped and the row left alone.
    """

    def __init__(self, states: list[GrammarState | None], end_ids: list[int]) -> None:
        self._states = states
        self._end_ids = end_ids
        self._started = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        last = input_ids[:, -1].tolist() if self._started else None
        self._started = True
        for row, state in enumerate(self._states):
            if state is None:
                continue
            if last is not None and not state.is_done():
                if last[row] in self._end_ids:
                    self._states[row] = None
                    continue
                state.advance(last[row])
            mask_logits(scores[row], state, self._end_ids)
        return scores
