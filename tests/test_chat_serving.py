"""Chat ``messages`` and template variables through a real ``templated-llm serve``: MLflow's
``/invocations`` and OpenAI's ``/v1/chat/completions``."""

from __future__ import annotations

import json
import sys

import mlflow
import openai
import pytest
import requests

from local_server import free_port, running_server
from templated_llm import log_llm

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a river."}]
SYSTEM = {"role": "system", "content": "Be brief."}
GREEDY = {"temperature": 0.0, "max_tokens": 6}


@pytest.fixture(scope="module")
def logged(tiny_model):
    return log_llm("llama2-chat", snapshot=tiny_model("llama"), name="chat-served")


@pytest.fixture(scope="module")
def expected(logged):
    model = mlflow.pyfunc.load_model(logged.model_uri)
    plain = model.predict({"messages": [CHAT]}, params=GREEDY)["candidates"][0]
    system = model.predict({"messages": [[SYSTEM, *CHAT]]}, params=GREEDY)["candidates"][0]
    return {"plain": plain, "system": system}


@pytest.fixture(scope="module")
def server(logged):
    port = free_port()
    command = [sys.executable, "-m", "templated_llm.cli", "serve", logged.model_uri, "--port", str(port)]
    with running_server(command, port) as url:
        yield url


def _post(url: str, body: object) -> requests.Response:
    return requests.post(f"{url}/invocations", data=json.dumps(body),
                         headers={"Content-Type": "application/json"}, timeout=120)


def _candidates(response: requests.Response) -> list[str]:
    assert response.status_code == 200, response.text
    body = response.json()
    rows = body["predictions"] if isinstance(body, dict) else body  # unified LLM input: unwrapped
    return [row["candidates"] for row in rows]


BODIES = {
    "inputs, one conversation": ({"inputs": {"messages": CHAT}}, ["plain"]),
    "inputs, conversations": ({"inputs": {"messages": [CHAT, CHAT]}}, ["plain", "plain"]),
    # MLflow makes one array of the conversations above: they must be of one length. Records
    # take conversations of any lengths.
    "inputs, records": ({"inputs": [{"messages": CHAT}, {"messages": [SYSTEM, *CHAT]}]},
                        ["plain", "system"]),
    "dataframe_records": ({"dataframe_records": [{"messages": CHAT}, {"messages": [SYSTEM, *CHAT]}]},
                          ["plain", "system"]),
    "dataframe_split": ({"dataframe_split": {"columns": ["messages"], "data": [[CHAT]]}}, ["plain"]),
    "OpenAI-style body": ({"messages": CHAT, **GREEDY}, ["plain"]),
    "OpenAI-style body with a system param": ({"messages": CHAT, **GREEDY, "system": "Be brief."},
                                              ["system"]),
    "system as a param": ({"inputs": {"messages": CHAT}, "params": {"system": "Be brief."}}, ["system"]),
}


@pytest.mark.parametrize("form", BODIES)
def test_every_request_format_takes_messages(server, expected, form):
    body, names = BODIES[form]
    body = {**body, "params": {**GREEDY, **body.get("params", {})}} if "messages" not in body else body
    assert _candidates(_post(server, body)) == [expected[n] for n in names]


BAD = {
    "unknown role": [{"role": "bot", "content": "hi"}],
    "ends with the assistant": CHAT[:2],
    "two user turns in a row": [CHAT[0], CHAT[0]],
    "content not a string": [{"role": "user", "content": 3}],
    "missing content": [{"role": "user"}],
}


@pytest.mark.parametrize("case", BAD)
def test_malformed_conversations_are_400_naming_the_problem(server, case):
    response = _post(server, {"inputs": {"messages": [BAD[case]]}, "params": GREEDY})
    assert response.status_code == 400, response.text
    assert "messages at row 0" in response.json()["message"]


def test_a_template_variable_must_be_a_string(server):
    response = _post(server, {"inputs": {"messages": CHAT}, "params": {"system": 3}})
    assert response.status_code == 400, response.text


def test_usage_columns_come_back_when_asked_for(server, expected):
    response = _post(server, {"inputs": {"messages": CHAT}, "params": {**GREEDY, "return_usage": True}})
    assert response.status_code == 200, response.text
    [row] = response.json()["predictions"]
    assert row["candidates"] == expected["plain"]
    assert row["prompt_tokens"] > 0 and 1 <= row["completion_tokens"] <= GREEDY["max_tokens"]
    assert row["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_the_openai_route_takes_the_conversation_its_system_prompt_and_template_variables(
        server, expected, stream):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)

    def answer(messages, **extra) -> str:
        response = client.chat.completions.create(model="llama2-chat", messages=messages, stream=stream,
                                                  **GREEDY, **extra)
        if not stream:
            return response.choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in response if c.choices)

    assert answer(CHAT) == expected["plain"]
    assert answer([SYSTEM, *CHAT]) == expected["system"]
    assert answer(CHAT, extra_body={"template_variables": {"system": "Be brief."}}) == expected["system"]
    # The 400s of a malformed conversation are predict's own, naming the field.
    with pytest.raises(openai.BadRequestError, match="messages at row 0") as raised:
        answer(CHAT[:2])
    assert raised.value.param == "messages"


def test_a_conversation_goes_on_with_the_message_the_server_returned(server):
    # The openai client's pattern: the returned message object goes back into the conversation,
    # with the fields the server put in it (refusal, annotations, ...), as it is or as a dict.
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    first = client.chat.completions.create(model="llama2-chat", messages=CHAT[:1], **GREEDY).choices[0].message
    follow = {"role": "user", "content": "Name a river."}
    by_hand = [CHAT[0], {"role": "assistant", "content": first.content}, follow]
    want = client.chat.completions.create(model="llama2-chat", messages=by_hand, **GREEDY).choices[0].message.content
    for returned in (first, first.model_dump()):
        response = client.chat.completions.create(model="llama2-chat", messages=[CHAT[0], returned, follow], **GREEDY)
        assert response.choices[0].message.content == want
    # An assistant turn may come back as refusal content, or with no content at all.
    refused = {"role": "assistant", "content": [{"type": "refusal", "refusal": first.content}]}
    response = client.chat.completions.create(model="llama2-chat", messages=[CHAT[0], refused, follow], **GREEDY)
    assert response.choices[0].message.content == want
    with pytest.raises(openai.BadRequestError, match="no tool calls") as raised:
        client.chat.completions.create(model="llama2-chat", **GREEDY, messages=[
            CHAT[0], {"role": "assistant", "content": None,
                      "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            follow])
    assert raised.value.param == "messages.1.tool_calls"


def test_a_body_predicted_in_python_is_read_as_the_server_reads_it(logged, expected):
    # MLflow's scoring server takes the body's fields named as params as params: so does predict.
    model = mlflow.pyfunc.load_model(logged.model_uri)
    assert model.predict({"messages": CHAT, **GREEDY})["candidates"][0] == expected["plain"]
    developer = {"role": "developer", "content": SYSTEM["content"]}
    assert model.predict({"messages": [developer, *CHAT], **GREEDY})["candidates"][0] == expected["system"]
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"input fields \['n'\] are neither 'prompt'"):
        model.predict({"messages": CHAT, "n": 2, **GREEDY})


def test_a_system_prompt_sent_twice_is_refused_as_the_openai_route_refuses_it(server, logged):
    # A system message and the system param: neither wins silently, in Python or served.
    model = mlflow.pyfunc.load_model(logged.model_uri)
    twice = "the request sets the system prompt twice, as a system message and as the 'system' param; send one"
    for body, params in (({"messages": [SYSTEM, *CHAT], "system": "Be long."}, GREEDY),
                         ({"messages": [[SYSTEM, *CHAT]]}, {**GREEDY, "system": "Be long."})):
        with pytest.raises(mlflow.exceptions.MlflowException, match=twice) as raised:
            model.predict(body, params=params)
        assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    response = _post(server, {"inputs": {"messages": [SYSTEM, *CHAT]}, "params": {**GREEDY, "system": "Be long."}})
    assert response.status_code == 400 and twice in response.json()["message"], response.text


def test_a_system_variable_at_its_default_beside_a_system_message_is_not_a_second_one(server, logged, expected):
    # MLflow sends every param a request leaves out as its default ("" for system): predict
    # cannot tell that from one sent, and the OpenAI route reads it the same way.
    model = mlflow.pyfunc.load_model(logged.model_uri)
    assert model.predict({"messages": [[SYSTEM, *CHAT]]}, params={**GREEDY, "system": ""})["candidates"][0] == \
        expected["system"]
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    response = client.chat.completions.create(model="llama2-chat", messages=[SYSTEM, *CHAT], **GREEDY,
                                              extra_body={"template_variables": {"system": ""}})
    assert response.choices[0].message.content == expected["system"]
