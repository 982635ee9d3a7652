"""A loaded model under hostile input: limits checked before generation, user text verbatim."""

from __future__ import annotations

import mlflow
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException

from templated_llm import log_llm

GREEDY = {"temperature": 0.0, "max_tokens": 4}


@pytest.fixture(scope="module")
def limited_model(tiny_snapshot):
    info = log_llm("mpt-instruct", snapshot=tiny_snapshot, name="limited",
                   max_rows_per_request=3, max_tokens_limit=300)
    return mlflow.pyfunc.load_model(info.model_uri)


@pytest.fixture
def no_generation(limited_model, monkeypatch):
    """Fails the test if generation starts: every limit is checked before it."""
    model = limited_model.unwrap_python_model().model

    def refuse(*args, **kwargs):
        raise AssertionError("generation started before the request was rejected")

    monkeypatch.setattr(model, "generate", refuse)


@pytest.mark.parametrize(("prompts", "params", "message"), [
    (["a", "b", "c", "d"], GREEDY, "4 prompts; this model accepts at most 3 per request"),
    (["hi"], {"max_tokens": 301}, "'max_tokens': at most 300 .*received 301"),
    (["word " * 1900], {"max_tokens": 200}, "exceeds the model's context of 2048 tokens"),
    (["ok", "x" * 10**7], GREEDY, "row 1 is 10000.* characters after templating; no text over"),
    (["ok", "bad \udcff"], GREEDY, "row 1 is not valid Unicode.*'\\\\udcff' at character 4"),
])
def test_each_limit_is_a_400_before_generation(limited_model, no_generation, prompts, params, message):
    with pytest.raises(MlflowException, match=message) as caught:
        limited_model.predict(prompts, params=params)
    assert caught.value.get_http_status_code() == 400


@pytest.mark.parametrize(("model_input", "params", "message"), [
    (["word " * 1900], {"max_tokens": 200}, r"^the prompt at row 2 is \d+ tokens after templating; with max_tokens=200"),
    (["x" * 10**7], GREEDY, "^the prompt at row 2 is 10000.* characters after templating"),
    (["bad \udcff"], GREEDY, "^prompt at row 2 is not valid Unicode"),
    ({"messages": [[{"role": "bot", "content": "hi"}]]}, GREEDY, "^messages at row 2: message 0 has role 'bot'"),
])
def test_a_row_sent_alone_is_named_by_its_place_in_the_callers_request(limited_model, no_generation,
                                                                      model_input, params, message):
    # A server sends each prompt of a request as a call of its own, saying where it stands.
    python_model = limited_model.unwrap_python_model()
    for call in (python_model.complete, python_model.generate_stream):
        with pytest.raises(MlflowException, match=message) as caught:
            call(model_input, params, first_row=2)
        assert caught.value.get_http_status_code() == 400


def test_requests_within_the_limits_generate(limited_model):
    assert len(limited_model.predict(["a", "b", "c"], params=GREEDY)) == 3


@pytest.mark.parametrize("temperature", [1e-300, 3e-47, 9e-6])
def test_a_temperature_near_0_decodes_greedily(limited_model, temperature):
    greedy = limited_model.predict(["a"], params=GREEDY)
    near = limited_model.predict(["a"], params={**GREEDY, "temperature": temperature, "top_p": 0.5})
    assert near["candidates"].tolist() == greedy["candidates"].tolist()


hostile_text = st.one_of(
    st.text(),
    # Template syntax, special tokens and control characters among arbitrary text.
    st.lists(st.one_of(st.text(), st.sampled_from([
        "{{", "}}", "{%", "%}", "{#", "#}", "{{ 7*7 }}", "{% for x in range(9) %}x{% endfor %}",
        "{{ prompt }}", "\x00", "\x1b[2J", "\r", "\n", "\u2028", "\ufeff", "\u202e", "\u00e9",
        "\u4e2d\u6587", "\U0001f600", "<|endoftext|>", "### Response:", "\\", "'", '"']))
    ).map("".join),
    # What "text" decoded from arbitrary bytes looks like, minus lone surrogates (a 400 of its own).
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    st.integers(1, 3000).map(lambda n: "{{ prompt }}" * n),
)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=hostile_text)
def test_user_text_reaches_the_model_verbatim_and_unevaluated(loaded_model, text):
    python_model = loaded_model.unwrap_python_model()
    [rendered] = python_model.render([text])
    before, _, after = python_model.render(["\0SENTINEL\0"])[0].partition("\0SENTINEL\0")
    assert rendered == before + text + after



@pytest.mark.parametrize("engine", [True, False], ids=["engine", "whole batches"])
def test_an_empty_prompt_under_a_bare_template_is_a_400_and_nothing_runs(tiny_snapshot, tmp_path, engine):
    # MPT's tokenizer adds no start token: "" under "{{ prompt }}" is no token at all.
    template = tmp_path / "bare.jinja"
    template.write_text("{{ prompt }}")
    model = mlflow.pyfunc.load_model(log_llm("mpt-instruct", snapshot=tiny_snapshot, template=str(template),
                                             name="bare", engine=engine).model_uri)
    for call in (lambda: model.predict(["Hi", ""], params=GREEDY), lambda: list(model.predict_stream("", GREEDY))):
        with pytest.raises(MlflowException, match="prompt at row [01] has no tokens after templating") as caught:
            call()
        assert caught.value.get_http_status_code() == 400
    engine_ = model.unwrap_python_model().engine
    assert engine_ is None or engine_.stats().running == 0
    assert model.predict(["Hi"], params=GREEDY)["candidates"][0]
