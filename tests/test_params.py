from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

from templated_llm import TemplateError
from templated_llm.runtime.params import GenerationParams, param_schema, split_template_variables, validate_params

BAD_PARAMS = [
    ("temperature", -0.1, "greater than or equal to 0"),
    ("temperature", 2.5, "less than or equal to 2"),
    ("temperature", "hot", "valid number"),
    ("max_tokens", 0, "greater than or equal to 1"),
    ("max_tokens", 1.5, "valid integer"),
    ("top_p", 0.0, "greater than 0"),
    ("top_p", 1.5, "less than or equal to 1"),
    ("top_k", -1, "greater than or equal to 0"),
    ("repetition_penalty", 0.0, "greater than 0"),
    ("repetition_penalty", 11.0, "less than or equal to 10"),
    ("stop", "###", "valid list"),
    ("stop", [""], "at least 1 character"),
    ("stop", ["x"] * 17, "at most 16 items"),
    ("seed", -5, "greater than or equal to 0"),
]


def _error_code(exc: MlflowException) -> int:
    return ErrorCode.Value(exc.error_code)


@pytest.mark.parametrize(("name", "value", "allowed"), BAD_PARAMS)
def test_bad_values_name_the_param_the_value_and_what_is_allowed(name, value, allowed) -> None:
    with pytest.raises(MlflowException) as caught:
        validate_params({name: value}, {})
    assert _error_code(caught.value) == INVALID_PARAMETER_VALUE
    message = caught.value.message
    assert repr(name) in message
    assert repr(value)[:40] in message
    assert allowed in message


def test_unknown_params_are_rejected_with_the_allowed_list() -> None:
    with pytest.raises(MlflowException, match="unknown param 'temprature'.*temperature"):
        validate_params({"temprature": 0.5}, {})


def test_an_unknown_field_inside_a_param_is_named_with_the_fields_it_takes() -> None:
    # Not "unknown param 'response_format'", which the allowed list then names.
    with pytest.raises(MlflowException, match=r"param 'response_format' has no field 'extra'; it takes \['type', 'json_schema'\]"):
        validate_params({"response_format": {"type": "text", "extra": 1}}, {})
    with pytest.raises(MlflowException, match=r"no field 'json_schema.bogus'; it takes \['name', 'description', 'schema', 'strict'\]"):
        validate_params({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "bogus": 1}}}, {})


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(MlflowException) as caught:
        validate_params({"temperature": -1, "max_tokens": 0}, {})
    assert "temperature" in caught.value.message and "max_tokens" in caught.value.message


def test_params_override_model_defaults() -> None:
    params = validate_params({"max_tokens": 8}, {"temperature": 0.1, "max_tokens": 256})
    assert (params.temperature, params.max_tokens) == (0.1, 8)
    assert validate_params(None, {}).greedy


def test_numpy_values_from_mlflow_are_accepted() -> None:
    params = validate_params(
        {"max_tokens": np.int64(3), "temperature": np.float64(0.5), "stop": np.array(["a", "b"])}, {}
    )
    assert (params.max_tokens, params.temperature, params.stop) == (3, 0.5, ["a", "b"])


@given(
    temperature=st.floats(0, 2),
    max_tokens=st.integers(1, 4096),
    top_p=st.floats(0, 1, exclude_min=True),
    top_k=st.integers(0, 1000),
    stop=st.lists(st.text(min_size=1), max_size=16),
    seed=st.none() | st.integers(0, 2**63 - 1),
)
def test_any_valid_combination_is_accepted(temperature, max_tokens, top_p, top_k, stop, seed) -> None:
    values = dict(temperature=temperature, max_tokens=max_tokens, top_p=top_p, top_k=top_k,
                  stop=stop, seed=seed)
    params = validate_params(values, {})
    assert params.model_dump(exclude={"repetition_penalty", "return_usage", "response_format"}) == values


def test_param_schema_has_every_param_with_the_model_defaults() -> None:
    schema = param_schema({"temperature": 0.1, "max_tokens": 64})
    specs = {spec.name: spec for spec in schema.params}
    assert set(specs) == set(GenerationParams.model_fields)
    assert specs["temperature"].default == 0.1
    # None: MLflow would send a default as if the caller chose it, and it could not shrink to
    # what the context leaves.
    assert specs["max_tokens"].default is None
    assert specs["stop"].shape == (-1,)
    assert specs["seed"].default is None
    assert specs["response_format"].default == {"type": "text"}


def test_template_variables_are_string_params_with_the_spec_defaults() -> None:
    schema = param_schema({}, {"system": "Be brief.", "context": ""})
    specs = {spec.name: spec for spec in schema.params}
    assert (specs["system"].dtype.name, specs["system"].default) == ("string", "Be brief.")
    assert specs["context"].default == ""
    variables, rest = split_template_variables({"system": "Hi", "max_tokens": 3}, ["system"])
    assert (variables, rest) == ({"system": "Hi"}, {"max_tokens": 3})
    with pytest.raises(MlflowException, match="'system' is a template variable and must be a string"):
        split_template_variables({"system": 3}, ["system"])


def test_a_template_variable_named_like_a_param_is_refused() -> None:
    with pytest.raises(TemplateError, match=r"\['max_tokens'\] have the names of inference params"):
        param_schema({}, {"max_tokens": "10"})
