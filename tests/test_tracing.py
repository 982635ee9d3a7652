"""MLflow traces of predict and of served requests: spans, attributes, token usage, switches."""

from __future__ import annotations

import json
import sys
import time

import mlflow
import mlflow.tracing.provider
import pandas as pd
import pytest
import requests
from mlflow.entities import SpanType
from mlflow.exceptions import MlflowException
from mlflow.tracing.constant import SpanAttributeKey

from local_server import free_port, running_server
from templated_llm import log_llm
from templated_llm.runtime.tracing import Tracer

SECRET = "zebra-secret-42"
GREEDY = {"temperature": 0.0, "max_tokens": 4}


def _last_trace():
    trace_id = mlflow.get_last_active_trace_id(thread_local=True)
    return None if trace_id is None else mlflow.get_trace(trace_id, flush=True)


def _spans(trace) -> dict[str, object]:
    return {span.name: span for span in trace.data.spans}


def _predict_traced(model, *args, **kwargs):
    """Predict, and the trace that predict left (None when it left none)."""
    before = mlflow.get_last_active_trace_id(thread_local=True)
    result = model.predict(*args, **kwargs)
    trace = _last_trace()
    return result, (None if trace is None or trace.info.trace_id == before else trace)


def test_a_predict_is_one_trace_with_templating_and_generation_spans(loaded_model):
    frame, trace = _predict_traced(loaded_model, ["Hi", "Name three rivers."],
                                   params={**GREEDY, "return_usage": True})
    spans = _spans(trace)
    assert set(spans) == {"mpt-instruct", "render_prompts", "generate"}
    root = spans["mpt-instruct"]
    assert root.parent_id is None and root.span_type == SpanType.LLM
    assert spans["render_prompts"].parent_id == root.span_id == spans["generate"].parent_id
    assert spans["generate"].span_type == SpanType.LLM
    assert root.inputs == {"prompts": ["Hi", "Name three rivers."]}
    assert [row["candidates"] for row in root.outputs] == frame["candidates"].tolist()
    assert "### Instruction:\nHi" in spans["render_prompts"].outputs["prompts"][0]
    assert root.get_attribute("templated_llm.template") == "mpt-instruct.jinja"
    assert root.get_attribute("templated_llm.template_version").startswith("sha256:")
    assert root.get_attribute("templated_llm.params")["max_tokens"] == 4
    usage = {"input_tokens": int(frame["prompt_tokens"].sum()),
             "output_tokens": int(frame["completion_tokens"].sum())}
    usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
    assert root.get_attribute(SpanAttributeKey.CHAT_USAGE) == usage
    assert trace.info.token_usage == usage  # counted once, though two spans carry it


def test_a_conversation_is_a_chat_model_span_holding_the_messages(tiny_model):
    model = mlflow.pyfunc.load_model(log_llm("llama2-chat", snapshot=tiny_model("llama")).model_uri)
    messages = [{"role": "user", "content": "Hi"}]
    _, trace = _predict_traced(model, {"messages": [messages]}, params=GREEDY)
    root = _spans(trace)["llama2-chat"]
    assert root.span_type == SpanType.CHAT_MODEL
    assert root.inputs == {"messages": messages}


def test_a_stream_is_one_trace_ending_with_it(loaded_model):
    chunks = list(loaded_model.predict_stream("Stream three rivers.", params=GREEDY))
    [trace] = [t for t in mlflow.search_traces(return_type="list", max_results=20, flush=True)
               if "Stream three rivers." in (t.info.request_preview or "")]
    root = _spans(trace)["mpt-instruct"]
    assert root.outputs["text"] == "".join(chunks)
    assert root.get_attribute(SpanAttributeKey.CHAT_USAGE)["output_tokens"] == GREEDY["max_tokens"] or \
        root.outputs["finish_reason"] == "stop"
    assert trace.info.state == "OK"


def test_a_stream_closed_unread_ends_its_trace(loaded_model):
    loaded_model.unwrap_python_model().generate_stream("Unread three rivers.", GREEDY).close()
    # An open span is never exported: the trace is found only once the span ended.
    [trace] = [t for t in mlflow.search_traces(return_type="list", max_results=20, flush=True)
               if "Unread three rivers." in (t.info.request_preview or "")]
    assert trace.info.state == "ERROR"


@pytest.mark.parametrize("call", ["predict", "predict_stream"])
@pytest.mark.parametrize(("model_input", "params", "named", "recorded_inputs"), [
    (["Hi"], {"temperature": 9.0}, "temperature", {"prompts": ["Hi"]}),  # a bad param
    # An input refused before its rows are read: the body as received.
    ({"prompt": ["Hi"], "colour": "red"}, {}, "colour", {"body": {"prompt": ["Hi"], "colour": "red"}}),
])
def test_a_failing_request_leaves_an_error_trace(loaded_model, call, model_input, params, named, recorded_inputs):
    before = mlflow.get_last_active_trace_id(thread_local=True)
    with pytest.raises(MlflowException):
        if call == "predict":
            loaded_model.predict(model_input, params=params)
        else:
            list(loaded_model.predict_stream(model_input, params=params))
    trace = _last_trace()
    assert trace.info.trace_id != before and trace.info.state == "ERROR"
    assert named in json.dumps(trace.to_dict())
    assert trace.data.spans[0].inputs == recorded_inputs


@pytest.mark.parametrize("call", ["predict", "predict_stream"])
@pytest.mark.parametrize("model_input", [
    ["Lone \udcff surrogate"], {"prompt": ["Lone \udcff surrogate"]},
    pd.DataFrame({"prompt": ["Lone \udcff surrogate"]}, dtype=object),
    pd.DataFrame({"messages": [[{"role": "user", "content": "Lone \udcff surrogate"}]]}),
], ids=["list", "dict", "frame", "messages-frame"])
def test_a_request_refused_for_a_lone_surrogate_is_traced_with_its_escape(loaded_model, call, model_input):
    # UTF-8 cannot encode a lone surrogate: a trace recording it as sent was never exported.
    before = mlflow.get_last_active_trace_id(thread_local=True)
    with pytest.raises(MlflowException, match="lone surrogate"):
        if call == "predict":
            loaded_model.predict(model_input, params=GREEDY)
        else:
            list(loaded_model.predict_stream(model_input, params=GREEDY))
    trace = _last_trace()
    assert trace is not None and trace.info.trace_id != before and trace.info.state == "ERROR"
    assert json.dumps("Lone \\udcff surrogate")[1:-1] in json.dumps(trace.data.spans[0].inputs)


@pytest.fixture(scope="module")
def no_content_model(tiny_snapshot):
    return log_llm("mpt-instruct", snapshot=tiny_snapshot, name="no-content", trace_content=False)


def test_without_content_no_prompt_or_completion_text_is_traced(no_content_model):
    model = mlflow.pyfunc.load_model(no_content_model.model_uri)
    frame, trace = _predict_traced(model, [f"Tell me about {SECRET}"], params=GREEDY)
    text = json.dumps(trace.to_dict())
    for secret in (SECRET, "### Instruction", frame["candidates"][0]):
        assert secret not in text
    root = _spans(trace)["mpt-instruct"]
    assert root.inputs == {"rows": 1}
    assert root.get_attribute(SpanAttributeKey.CHAT_USAGE)["output_tokens"] > 0


def test_a_template_variable_is_content_too(tiny_model, monkeypatch):
    monkeypatch.setenv("TEMPLATED_LLM_TRACE_CONTENT", "false")
    model = mlflow.pyfunc.load_model(log_llm("llama2-chat", snapshot=tiny_model("llama")).model_uri)
    _, trace = _predict_traced(model, {"messages": [[{"role": "user", "content": "Hi"}]]},
                               params={**GREEDY, "system": SECRET})
    assert SECRET not in json.dumps(trace.to_dict())
    assert _spans(trace)["llama2-chat"].get_attribute("templated_llm.params")["system"] == "<not traced>"


def test_tracing_is_off_with_the_logged_flag_the_environment_or_mlflow(
    tiny_snapshot, logged_model, loaded_model, monkeypatch
):
    untraced = mlflow.pyfunc.load_model(
        log_llm("mpt-instruct", snapshot=tiny_snapshot, name="untraced", tracing=False).model_uri)
    assert _predict_traced(untraced, ["Hi"], params=GREEDY)[1] is None
    monkeypatch.setenv("TEMPLATED_LLM_TRACING", "false")
    assert _predict_traced(mlflow.pyfunc.load_model(logged_model.model_uri), ["Hi"],
                           params=GREEDY)[1] is None
    monkeypatch.delenv("TEMPLATED_LLM_TRACING")
    mlflow.tracing.disable()
    try:
        assert _predict_traced(loaded_model, ["Hi"], params=GREEDY)[1] is None
    finally:
        mlflow.tracing.enable()
    assert _predict_traced(loaded_model, ["Hi"], params=GREEDY)[1] is not None


def test_a_bad_switch_value_fails_the_load_naming_the_variable(logged_model, monkeypatch):
    monkeypatch.setenv("TEMPLATED_LLM_TRACING", "sometimes")
    with pytest.raises(ValueError, match="TEMPLATED_LLM_TRACING='sometimes'"):
        mlflow.pyfunc.load_model(logged_model.model_uri)


@pytest.mark.slow
def test_a_served_request_is_traced_to_the_servers_experiment(logged_model):
    port = free_port()
    command = [sys.executable, "-m", "templated_llm.cli", "serve", logged_model.model_uri, "--port", str(port)]
    with running_server(command, port) as url:
        response = requests.post(f"{url}/invocations", json={"inputs": [SECRET], "params": GREEDY}, timeout=120)
        assert response.status_code == 200, response.text
        deadline = time.monotonic() + 60  # the server logs traces asynchronously
        while time.monotonic() < deadline:
            found = [t for t in mlflow.search_traces(return_type="list", max_results=20)
                     if SECRET in (t.info.request_preview or "")]
            if found:
                break
            time.sleep(1)
    [trace] = found
    root = _spans(trace)["mpt-instruct"]
    assert root.outputs[0]["candidates"] == response.json()["predictions"][0]["candidates"]
    assert trace.info.token_usage["output_tokens"] > 0


def _tracer(enabled: bool = True) -> Tracer:
    return Tracer(enabled=enabled, content=True, model="m", template="t.jinja", template_version="v1", task=None)


def test_a_server_tracing_every_request_into_a_store_it_writes_itself_is_warned(monkeypatch):
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "sqlite:///srv/mlflow.db")
    warning = _tracer().cost_warning()
    assert warning.startswith("every request is traced into sqlite:///srv/mlflow.db: this process writes each trace")
    assert "MLFLOW_TRACE_SAMPLING_RATIO=0.1" in warning and "TEMPLATED_LLM_TRACING=false" in warning
    assert _tracer(enabled=False).cost_warning() is None
    monkeypatch.setenv("TEMPLATED_LLM_TRACING", "false")
    assert _tracer().cost_warning() is None
    monkeypatch.delenv("TEMPLATED_LLM_TRACING")
    monkeypatch.setenv("MLFLOW_TRACE_SAMPLING_RATIO", "0.1")  # a share: the cost is that share
    assert _tracer().cost_warning() is None
    monkeypatch.setenv("MLFLOW_TRACE_SAMPLING_RATIO", "1.0")
    assert _tracer().cost_warning() is not None
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "https://tracking.example.com")
    assert _tracer().cost_warning() is None  # a tracking server writes them
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "/srv/mlruns")
    assert _tracer().cost_warning() is not None
    monkeypatch.setattr(mlflow.tracing.provider, "is_tracing_enabled", lambda: False)  # disabled in MLflow
    assert _tracer().cost_warning() is None


def test_without_content_a_refused_request_traces_no_text_of_it(no_content_model):
    # A 400's message quotes the value received: the error trace keeps only what failed.
    model = mlflow.pyfunc.load_model(no_content_model.model_uri)
    with pytest.raises(MlflowException, match=SECRET):  # the caller still gets the whole message
        model.predict([{"text": f"Tell me about {SECRET}"}], params=GREEDY)
    trace = _last_trace()
    assert trace.info.state == "ERROR"
    text = json.dumps(trace.to_dict())
    assert SECRET not in text and "MlflowException" in text and "INVALID_PARAMETER_VALUE" in text


def test_rows_given_different_max_tokens_are_traced_each_with_its_own(logged_model):
    # An omitted max_tokens is fitted to each prompt on the engine: the trace lists what each
    # row was given, not the largest of them.
    model = mlflow.pyfunc.load_model(logged_model.model_uri,
                                     model_config={"max_num_seqs": 2, "max_cache_tokens": 2 * 96})
    frame, trace = _predict_traced(model, ["hi", "river " * 25], params={"temperature": 0.0, "return_usage": True})
    fitted = [96 - n for n in frame["prompt_tokens"]]
    assert len(set(fitted)) == 2
    assert _spans(trace)["mpt-instruct"].get_attribute("templated_llm.params")["max_tokens"] == fitted
