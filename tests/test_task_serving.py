"""Models logged with MLflow's ``llm/v1/chat`` and ``llm/v1/completions`` tasks behind a real
``mlflow models serve``, called with MLflow's own request and response classes.

(MLflow's ``ScoringServerClient`` cannot read these answers: it expects ``{"predictions": ...}``,
and MLflow answers an OpenAI-shaped body unwrapped.)"""

from __future__ import annotations

import json
import sys

import jsonschema
import mlflow
import pandas as pd
import pytest
import requests
from mlflow.models import Model
from mlflow.types.llm import (
    CHAT_MODEL_INPUT_SCHEMA,
    CHAT_MODEL_OUTPUT_SCHEMA,
    COMPLETIONS_MODEL_INPUT_SCHEMA,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
)

from local_server import free_port, running_server
from templated_llm import TaskError, log_llm
from templated_llm.engine import EngineConfig
from test_chat_serving import CHAT, GREEDY, SYSTEM  # the same conversations as the default schema's

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chat_model(tiny_model):
    return log_llm("llama2-chat", snapshot=tiny_model("llama"), name="chat-task", task="llm/v1/chat")


@pytest.fixture(scope="module")
def completions_model(tiny_snapshot):
    return log_llm("mpt-instruct", snapshot=tiny_snapshot, name="completions-task",
                   task="llm/v1/completions")


def _serve(model_uri: str):
    port = free_port()
    command = [sys.executable, "-m", "templated_llm.cli", "serve", model_uri, "--port", str(port)]
    return running_server(command, port)


@pytest.fixture(scope="module")
def chat_server(chat_model):
    with _serve(chat_model.model_uri) as url:
        yield url


@pytest.fixture(scope="module")
def expected(tiny_model):
    # The same conversations through the default schema, in this process.
    model = mlflow.pyfunc.load_model(log_llm("llama2-chat", snapshot=tiny_model("llama")).model_uri)
    frame = model.predict({"messages": [CHAT, [SYSTEM, *CHAT]]}, params={**GREEDY, "return_usage": True})
    plain, system = frame.to_dict("records")
    return {"plain": plain, "system": system}


def _post(url: str, body: object) -> requests.Response:
    return requests.post(f"{url}/invocations", data=json.dumps(body),
                         headers={"Content-Type": "application/json"}, timeout=120)


def test_the_logged_model_carries_mlflows_own_signature_and_task(chat_model, completions_model):
    chat = Model.load(chat_model.model_uri)
    assert chat.metadata["task"] == "llm/v1/chat"
    assert chat.signature.inputs == CHAT_MODEL_INPUT_SCHEMA
    assert chat.signature.outputs == CHAT_MODEL_OUTPUT_SCHEMA
    # What the chat body cannot carry travels as params.
    assert {p.name for p in chat.signature.params} == {"repetition_penalty", "seed", "system", "response_format"}
    completions = Model.load(completions_model.model_uri)
    assert completions.metadata["task"] == "llm/v1/completions"
    assert completions.signature.inputs == COMPLETIONS_MODEL_INPUT_SCHEMA


def test_a_chat_completion_request_gets_one_chat_completion_object(chat_server, expected):
    request = ChatCompletionRequest(
        messages=[ChatMessage(role=m["role"], content=m["content"]) for m in CHAT], **GREEDY
    )
    answer = _post(chat_server, request.to_dict())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert isinstance(body, dict) and "predictions" not in body  # one object, not a list
    response = ChatCompletionResponse.from_dict(body)
    assert response.object == "chat.completion" and response.model == "llama2-chat"
    [choice] = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected["plain"]["candidates"]
    assert choice.finish_reason == expected["plain"]["finish_reason"]
    assert response.usage.prompt_tokens == expected["plain"]["prompt_tokens"]
    assert response.usage.completion_tokens == expected["plain"]["completion_tokens"]
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_a_system_message_and_params_beyond_the_chat_schema(chat_server, expected):
    by_message = _post(chat_server, {"messages": [SYSTEM, *CHAT], **GREEDY})
    by_param = _post(chat_server, {"messages": CHAT, **GREEDY, "system": "Be brief.", "seed": 3})
    for response in (by_message, by_param):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == expected["system"]["candidates"]


@pytest.mark.parametrize(("body", "named"), [
    ({"messages": CHAT, "n": 2}, "'n'"),
    ({"messages": CHAT, "stream": True}, "'stream'"),
    ({"messages": CHAT, "presence_penalty": 0.5}, "'presence_penalty'"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "role 'bot'"),
    ({"messages": CHAT, "temperature": 9.0}, "param 'temperature'"),
    ({"messages": CHAT, "max_tokens": 100000}, "max_tokens"),
    ({"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "strin"}}}}, "json_schema.schema cannot be enforced: Invalid type: strin"),
])
def test_what_the_model_cannot_serve_is_a_400_naming_it(chat_server, body, named):
    response = _post(chat_server, body)
    assert response.status_code == 400, response.text
    assert named in response.json()["message"]


def test_an_openai_response_format_constrains_the_answer(chat_server):
    schema = {"type": "object", "properties": {"river": {"type": "string", "maxLength": 8},
                                               "length_km": {"type": "integer", "minimum": 1, "maximum": 7000}},
              "required": ["river", "length_km"]}
    body = {"messages": CHAT, "temperature": 0.0, "max_tokens": 64,
            "response_format": {"type": "json_schema", "json_schema": {"name": "river", "schema": schema, "strict": True}}}
    response = _post(chat_server, body)
    assert response.status_code == 200, response.text
    [choice] = response.json()["choices"]
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    assert choice["finish_reason"] == "stop"


def test_a_completions_request_gets_one_text_completion(completions_model):
    body = {"prompt": "Name three rivers.", **GREEDY, "stop": ["zzz"]}
    local = mlflow.pyfunc.load_model(completions_model.model_uri).predict(body)
    with _serve(completions_model.model_uri) as url:
        answer = _post(url, body)
    assert answer.status_code == 200, answer.text
    response = answer.json()
    assert response["object"] == "text_completion"
    [choice] = response["choices"]
    assert choice["text"] == local["choices"][0]["text"]
    assert choice["finish_reason"] in ("stop", "length")
    assert response["usage"]["total_tokens"] == sum(
        response["usage"][k] for k in ("prompt_tokens", "completion_tokens"))


def test_a_completions_request_of_several_prompts_gets_a_choice_each(completions_model, loaded_model):
    # OpenAI's completions API takes a list of prompts; the rest were dropped without a word.
    model = mlflow.pyfunc.load_model(completions_model.model_uri)
    prompts = ["Name three rivers.", "hi"]
    response = model.predict({"prompt": prompts, **GREEDY})
    want = loaded_model.predict(prompts, params={**GREEDY, "return_usage": True})
    assert [c["index"] for c in response["choices"]] == [0, 1]
    assert [c["text"] for c in response["choices"]] == want["candidates"].tolist()
    assert response["usage"]["prompt_tokens"] == int(want["prompt_tokens"].sum())
    assert response["usage"]["completion_tokens"] == int(want["completion_tokens"].sum())


def test_the_requests_of_one_frame_generate_side_by_side(chat_model, monkeypatch):
    # One request after another would leave the engine one sequence at a time.
    model = mlflow.pyfunc.load_model(chat_model.model_uri)
    engine = model.unwrap_python_model().engine
    running = []
    step = type(engine._scheduler)._step  # noqa: SLF001
    monkeypatch.setattr(type(engine._scheduler), "_step",  # noqa: SLF001
                        lambda self: (running.append(len(self.running)), step(self))[1])
    model.predict(pd.DataFrame({"messages": [CHAT] * 3, "max_tokens": [6] * 3, "temperature": [0.0] * 3}))
    assert max(running) == 3


def test_openai_chat_messages_are_taken_as_mlflows_chat_schema_allows_them(chat_model, expected):
    model = mlflow.pyfunc.load_model(chat_model.model_uri)
    # The developer role is the system one; a name and fields left null change nothing.
    messages = [{"role": "developer", "content": SYSTEM["content"], "name": "ops"},
                *({**m, "name": "bob", "refusal": None, "tool_calls": None} for m in CHAT)]
    response = model.predict({"messages": messages, **GREEDY})
    assert response["choices"][0]["message"]["content"] == expected["system"]["candidates"]
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"message 0 has fields \['tool_call_id'\] that "
                                                             "this model does not support"):
        model.predict({"messages": [{**CHAT[0], "tool_call_id": "call-1"}], **GREEDY})
    calls = [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"message 1 has fields \['tool_calls'\]"):
        model.predict({"messages": [CHAT[0], {"role": "assistant", "content": None, "tool_calls": calls},
                                    CHAT[0]], **GREEDY})
    # An assistant turn as the API returns it: empty tool_calls, and no content but a refusal.
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": [],
                                                 "refusal": "No."}, *CHAT]
    written = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No."}, *CHAT]
    assert model.predict({"messages": turn, **GREEDY})["choices"][0]["message"]["content"] == \
        model.predict({"messages": written, **GREEDY})["choices"][0]["message"]["content"]


def test_a_refused_chat_request_leaves_a_chat_trace_of_its_body(chat_model):
    model = mlflow.pyfunc.load_model(chat_model.model_uri)
    with pytest.raises(mlflow.exceptions.MlflowException, match="request field 'n'"):
        model.predict({"messages": CHAT, "n": 2, **GREEDY})
    trace = mlflow.get_trace(mlflow.get_last_active_trace_id(thread_local=True), flush=True)
    root = next(span for span in trace.data.spans if span.parent_id is None)
    assert trace.info.state == "ERROR" and root.span_type == "CHAT_MODEL"
    assert root.inputs["body"][0]["messages"][0]["content"] == CHAT[0]["content"]


def test_several_requests_in_one_frame_get_a_response_each(chat_model, expected):
    model = mlflow.pyfunc.load_model(chat_model.model_uri)
    responses = model.predict(pd.DataFrame({"messages": [CHAT, [SYSTEM, *CHAT]],
                                            "max_tokens": [6, 6], "temperature": [0.0, 0.0]}))
    assert [r["choices"][0]["message"]["content"] for r in responses] == [
        expected["plain"]["candidates"], expected["system"]["candidates"]]


def test_a_refusal_in_a_frame_names_the_request_it_is_about(chat_model):
    model = mlflow.pyfunc.load_model(chat_model.model_uri)
    frame = pd.DataFrame({"messages": [CHAT, CHAT], "max_tokens": [6, -1], "temperature": [0.0, 0.0]})
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"^request 1 \(of 2 in the frame\): param 'max_tokens'") as raised:
        model.predict(frame)
    assert raised.value.get_http_status_code() == 400
    frame = pd.DataFrame({"messages": [CHAT, [{"role": "user", "content": "x " * 5000}]],
                          "max_tokens": [6, 6], "temperature": [0.0, 0.0]})
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"^request 1 \(of 2 in the frame\): prompt at row 0"):
        model.predict(frame)
    # One request alone is named by its fields only.
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"^param 'max_tokens'"):
        model.predict({"messages": CHAT, "max_tokens": -1})


def test_several_requests_in_one_frame_are_traced_each_with_its_params(chat_model):
    model = mlflow.pyfunc.load_model(chat_model.model_uri)
    model.predict(pd.DataFrame({"messages": [CHAT, CHAT], "max_tokens": [2, 3], "temperature": [0.0, 0.0]}))
    trace = mlflow.get_trace(mlflow.get_last_active_trace_id(thread_local=True), flush=True)
    root = next(span for span in trace.data.spans if span.parent_id is None)
    assert [p["max_tokens"] for p in root.get_attribute("templated_llm.params")] == [2, 3]


def test_the_chat_task_needs_a_chat_model(tiny_snapshot):
    with pytest.raises(TaskError, match="does not take chat messages"):
        log_llm("mpt-instruct", snapshot=tiny_snapshot, task="llm/v1/chat")
    with pytest.raises(TaskError, match="llm/v1/embeddings"):
        log_llm("mpt-instruct", snapshot=tiny_snapshot, task="llm/v1/embeddings")


def test_predict_stream_takes_the_request_bodys_params(chat_model, completions_model, expected):
    chat = mlflow.pyfunc.load_model(chat_model.model_uri)
    body = {"messages": CHAT, **GREEDY}
    assert "".join(chat.predict_stream(body)) == expected["plain"]["candidates"]
    assert "".join(chat.predict_stream({**body, "stream": True})) == expected["plain"]["candidates"]
    completions = mlflow.pyfunc.load_model(completions_model.model_uri)
    body = {"prompt": "Name three rivers.", "temperature": 0.0, "max_tokens": 3}
    [choice] = completions.predict(body)["choices"]
    assert "".join(completions.predict_stream(body)) == choice["text"]
    with pytest.raises(mlflow.exceptions.MlflowException, match="request field 'n'"):
        list(completions.predict_stream({**body, "n": 2}))


def test_a_frame_of_more_requests_than_the_engine_queues_is_served_in_turn(tiny_snapshot):
    # Submitting every request at once would refuse what an idle engine can serve in turn.
    info = log_llm("mpt-instruct", snapshot=tiny_snapshot, name="small-queue", task="llm/v1/completions",
                   engine=EngineConfig(max_num_seqs=1, max_waiting=2))
    model = mlflow.pyfunc.load_model(info.model_uri)
    responses = model.predict(pd.DataFrame({"prompt": ["a", "b", "c", "d"], "max_tokens": [3] * 4,
                                            "temperature": [0.0] * 4}))
    assert [r["choices"][0]["finish_reason"] for r in responses] == ["length"] * 4
