"""Structured output (``response_format``) on the tiny random MPT: whatever the schema, every
output parses and validates, though the weights are random."""

from __future__ import annotations

import functools
import json
import string

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException

from templated_llm.runtime.generation import end_ids
from templated_llm.runtime.params import GenerationParams
from templated_llm.runtime.structured import GrammarLogitsProcessor, ResponseFormat

PROMPTS = ["Describe a river as JSON.", "Name three cities."]
NAMES = st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=6)
LEAVES = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda low, more: {"type": "string", "minLength": low, "maxLength": low + more},
              st.integers(0, 2), st.integers(0, 5)),
    st.builds(lambda low, span: {"type": "integer", "minimum": low, "maximum": low + span},
              st.integers(-50, 50), st.integers(0, 200)),
    st.lists(st.one_of(NAMES, st.integers(-9, 99)), min_size=1, max_size=4, unique=True).map(
        lambda values: {"enum": values}),
)


def _objects(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.dictionaries(NAMES, children, min_size=1, max_size=3).flatmap(
        lambda properties: st.sets(st.sampled_from(sorted(properties))).map(
            lambda required: {"type": "object", "properties": properties, "required": sorted(required)}))


def _arrays(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(lambda items, low, more: {"type": "array", "items": items, "minItems": low,
                                               "maxItems": low + more},
                     children, st.integers(0, 1), st.integers(0, 2))


SCHEMAS = _objects(st.recursive(LEAVES, lambda c: st.one_of(_objects(c), _arrays(c)), max_leaves=6))


def _max_bytes(schema: dict) -> int:
    """The longest compact JSON text ``schema`` allows: a bound on its tokens (each at least a
    byte), so a generation given that many tokens (and one to end) must finish."""
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    kind = schema["type"]
    if kind == "string":
        return 2 + 6 * schema["maxLength"]  # a character may be written as a \uXXXX escape
    if kind == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind == "array":
        return 2 + schema["maxItems"] * (_max_bytes(schema["items"]) + 1)
    if kind == "object":
        return 2 + sum(len(json.dumps(k)) + 2 + _max_bytes(v) for k, v in schema["properties"].items())
    return {"boolean": 5, "null": 4}[kind]


def _json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@settings(max_examples=12, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, temperature=st.sampled_from([0.0, 1.0]))
def test_every_output_parses_and_validates(loaded_model, schema, temperature):
    bound = _max_bytes(schema)
    assume(bound <= 400)
    frame = loaded_model.predict(PROMPTS, params={
        "response_format": _json_schema(schema), "max_tokens": bound + 1, "temperature": temperature,
        "seed": 0 if temperature else None, "return_usage": True})
    for text, reason in zip(frame["candidates"], frame["finish_reason"]):
        jsonschema.validate(json.loads(text), schema)
        assert reason == "stop"


def test_json_object_is_an_object(loaded_model):
    frame = loaded_model.predict(PROMPTS, params={"response_format": {"type": "json_object"},
                                                  "max_tokens": 200, "return_usage": True})
    for text, reason in zip(frame["candidates"], frame["finish_reason"]):
        # A random model may write an object longer than max_tokens; one that ends is whole.
        assert text.startswith("{")
        assert reason == "length" or isinstance(json.loads(text), dict)


def test_a_stream_is_held_to_the_schema_too(loaded_model):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"]}
    params = {"response_format": _json_schema(schema), "max_tokens": 16, "temperature": 0.0}
    streamed = "".join(loaded_model.predict_stream(PROMPTS[0], params=params))
    assert streamed == loaded_model.predict(PROMPTS[:1], params=params)["candidates"][0]
    jsonschema.validate(json.loads(streamed), schema)


def test_text_is_free_generation(loaded_model):
    free = loaded_model.predict(PROMPTS, params={"max_tokens": 12, "temperature": 0.0})
    text = loaded_model.predict(PROMPTS, params={"max_tokens": 12, "temperature": 0.0,
                                                 "response_format": {"type": "text"}})
    assert text.equals(free)


def test_constrained_and_free_rows_share_a_batch(loaded_model):
    llm = loaded_model.unwrap_python_model()
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"]}
    grammar = llm.structured.compile(ResponseFormat.model_validate(_json_schema(schema)))
    ids, _ = llm.tokens.encode(llm.render(PROMPTS), 16)
    batch = llm.tokens.pad(ids, llm.device)
    ends = sorted(end_ids(llm.model.generation_config, llm.tokenizer))
    common = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": llm.tokenizer.pad_token_id}
    with torch.inference_mode():
        mixed = llm.model.generate(**batch, **common, logits_processor=[
            GrammarLogitsProcessor([grammar.start(), None], ends)])
        free = llm.model.generate(**batch, **common)
    width = batch["input_ids"].shape[1]
    constrained, unconstrained = llm.tokenizer.batch_decode(mixed[:, width:], skip_special_tokens=True)
    jsonschema.validate(json.loads(constrained), schema)
    assert unconstrained == llm.tokenizer.decode(free[1, width:], skip_special_tokens=True)


def test_on_the_engine_constrained_and_free_sequences_run_side_by_side(loaded_model, monkeypatch):
    llm = loaded_model.unwrap_python_model()
    assert llm.engine is not None
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"]}
    grammar = llm.structured.compile(ResponseFormat.model_validate(_json_schema(schema)))
    (constrained_ids, free_ids), _ = llm.tokens.encode(llm.render(PROMPTS), 16)
    params = GenerationParams(temperature=0.0, max_tokens=16)
    alone = llm.engine.submit(free_ids, params).result()
    scheduler = llm.engine._scheduler
    steps: list[list[bool]] = []  # per sampling step, which rows were constrained
    advance = scheduler._advance
    monkeypatch.setattr(scheduler, "_advance", lambda states, logits: (
        steps.append([s.grammar is not None for s in states]), advance(states, logits)))
    # Queued under the scheduler's lock, they are admitted at once and share its steps.
    with scheduler.condition:
        constrained = llm.engine.submit(constrained_ids, params, grammar)
        free = llm.engine.submit(free_ids, params)
    jsonschema.validate(json.loads(constrained.result().text), schema)
    assert [True, False] in steps  # one step sampled both rows: one masked, one not
    assert constrained.result().finish_reason == "stop"
    assert free.result() == alone


@pytest.mark.parametrize(("response_format", "named"), [
    (_json_schema({"type": "strin"}), "json_schema.schema cannot be enforced: Invalid type: strin"),
    (_json_schema({"type": "string", "pattern": "[a-"}), "unclosed character class"),
    (_json_schema({"$ref": "#/$defs/missing"}), "'/$defs/missing' does not exist"),
    (_json_schema({"type": "array", "minItems": 3, "maxItems": 1}), "minItems (3) is greater than maxItems (1)"),
    ({"type": "json_schema"}, "'json_schema' is required"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "field json_schema.name: Field required"),
    ({"type": "xml"}, "param 'response_format' field type"),
    (_json_schema(functools.reduce(lambda inner, _: {"type": "array", "items": inner}, range(200), {})),
     "nests JSON objects and arrays 201 levels deep; at most 128 are allowed"),
])
def test_an_invalid_response_format_is_a_400_naming_the_problem(loaded_model, response_format, named):
    with pytest.raises(MlflowException) as raised:
        loaded_model.predict(["Hi"], params={"response_format": response_format})
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert named in raised.value.message


def test_a_state_refuses_a_token_its_mask_does_not_allow(loaded_model):
    llm = loaded_model.unwrap_python_model()
    state = llm.structured.compile(ResponseFormat(type="json_object")).start()
    mask = state.allowed_token_mask()
    assert mask.shape == (llm.model.config.vocab_size,) and mask.dtype == torch.bool
    refused = int((~mask).nonzero()[0])
    with pytest.raises(ValueError, match=f"token {refused} is not allowed"):
        state.advance(refused)


def test_a_response_format_compiles_once(loaded_model):
    llm = loaded_model.unwrap_python_model()
    first = llm.structured.compile(ResponseFormat.model_validate(_json_schema({"type": "integer"})))
    again = llm.structured.compile(ResponseFormat.model_validate(_json_schema({"type": "integer"})))
    assert first is again


def test_a_const_that_looks_like_a_schema_is_written_as_sent(loaded_model):
    schema = {"type": "object", "properties": {"k": {"const": {"properties": 1}}}, "required": ["k"]}
    frame = loaded_model.predict(PROMPTS[:1], params={
        "response_format": _json_schema(schema), "max_tokens": 60, "temperature": 0.0, "return_usage": True})
    assert json.loads(frame["candidates"][0]) == {"k": {"properties": 1}}
    assert frame["finish_reason"][0] == "stop"


def test_an_object_composed_with_allof_takes_every_branchs_properties(loaded_model):
    # Closed, each branch would refuse the other's property: the schema was unsatisfiable.
    schema = {"type": "object", "allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]},
                                          {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]}
    frame = loaded_model.predict(PROMPTS[:1], params={
        "response_format": _json_schema(schema), "max_tokens": 40, "temperature": 0.0, "return_usage": True})
    # Left open, the random model may write further keys to max_tokens; what it wrote is held.
    text = frame["candidates"][0]
    if frame["finish_reason"][0] == "stop":
        jsonschema.validate(json.loads(text), schema)
    assert text.startswith("{")


def test_objects_the_schema_leaves_open_are_closed():
    from templated_llm.runtime.structured import _closed

    nested = {"type": "object", "properties": {"p": {"type": "object", "properties": {"q": {}}},
                                               "r": {"type": "array", "items": {"properties": {}}}},
              "$defs": {"d": {"properties": {}}}, "anyOf": [{"properties": {}}],
              "additionalProperties": {"properties": {}}}
    closed = _closed(nested)
    assert closed["additionalProperties"] == {"properties": {}, "additionalProperties": False}  # the user's
    for sub in (closed["properties"]["p"], closed["properties"]["r"]["items"], closed["$defs"]["d"], closed["anyOf"][0]):
        assert sub["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["p"]["properties"]  # a name, not a schema
    composed = _closed({"properties": {"c": {}}, "allOf": [{"properties": {"a": {"properties": {}}}}]})
    assert "additionalProperties" not in composed and "additionalProperties" not in composed["allOf"][0]
    assert composed["allOf"][0]["properties"]["a"]["additionalProperties"] is False
