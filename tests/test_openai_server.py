"""``templated-llm serve``'s OpenAI routes through the official ``openai`` client, sync and async,
against a real server process (MPT-instruct, an instruction model taking single-turn chats)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import jsonschema
import openai
import pytest
import requests

from openai_servers import metric, openai_server
from templated_llm import log_llm
from templated_llm.serving import API_KEY_ENV

pytestmark = pytest.mark.slow

NAME = "tiny-openai"
KEY = "test-key"
PROMPT = "Name three rivers."
GREEDY = {"temperature": 0.0, "max_tokens": 8}


@pytest.fixture(scope="module")
def server(tiny_snapshot):
    info = log_llm("mpt-instruct", snapshot=tiny_snapshot, name="openai-served",
                   registered_model_name=NAME)
    with openai_server(f"models:/{NAME}/{info.registered_model_version}", env={API_KEY_ENV: KEY}) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def _predicted(model, prompt: str, **params) -> dict:
    [row] = model.predict([prompt], params={**params, "return_usage": True}).to_dict("records")
    return row


@dataclass
class Answer:
    texts: list[str]
    finish_reasons: list[str]
    usage: openai.types.CompletionUsage
    ids: set[str]


def _ask(server: str, kind: str, route: str, stream: bool, **body) -> Answer:
    """One request through the sync or async client, streamed or not, read into an Answer."""
    if route == "chat":
        body = {"messages": [{"role": "user", "content": body.pop("prompt")}], **body}
    extra = {"stream_options": {"include_usage": True}} if stream else {}

    async def ask_async() -> Answer:
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0) as client:
            create = client.chat.completions.create if route == "chat" else client.completions.create
            response = await create(model=NAME, stream=stream, **extra, **body)
            return _read([c async for c in response] if stream else response, route, stream)

    if kind == "async":
        return asyncio.run(ask_async())
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    create = client.chat.completions.create if route == "chat" else client.completions.create
    response = create(model=NAME, stream=stream, **extra, **body)
    return _read(list(response) if stream else response, route, stream)


def _read(response, route: str, stream: bool) -> Answer:
    if not stream:
        choices = sorted(response.choices, key=lambda c: c.index)
        texts = [c.message.content if route == "chat" else c.text for c in choices]
        return Answer(texts, [c.finish_reason for c in choices], response.usage, {response.id})
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in response:
        for choice in chunk.choices:
            text = choice.delta.content if route == "chat" else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (text or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert response[-1].choices == [] and all(c.usage is None for c in response[:-1])
    return Answer([texts[i] for i in sorted(texts)], [finish[i] for i in sorted(finish)],
                  response[-1].usage, {c.id for c in response})


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("route", ["chat", "completions"])
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_both_routes_answer_what_predict_answers_with_its_usage(server, loaded_model, kind, route, stream):
    want = _predicted(loaded_model, PROMPT, **GREEDY)
    answer = _ask(server, kind, route, stream, prompt=PROMPT, **GREEDY)
    assert answer.texts == [want["candidates"]]
    assert answer.finish_reasons == [want["finish_reason"]]
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        want["prompt_tokens"], want["completion_tokens"])
    assert answer.usage.total_tokens == want["prompt_tokens"] + want["completion_tokens"]
    [id_] = answer.ids
    assert id_.startswith("chatcmpl-" if route == "chat" else "cmpl-")


def test_a_response_has_openais_fields(client):
    response = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}],
                                              **GREEDY)
    assert response.object == "chat.completion" and response.model == NAME
    assert response.system_fingerprint.startswith("fp_") and response.created > 0
    assert response.choices[0].message.role == "assistant"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_stop_string_ends_the_text_where_predict_ends_it(server, loaded_model, stream):
    text = _predicted(loaded_model, PROMPT, **GREEDY)["candidates"]
    stop = text[3:5]
    want = _predicted(loaded_model, PROMPT, **GREEDY, stop=[stop])
    answer = _ask(server, "sync", "completions", stream, prompt=PROMPT, stop=stop, **GREEDY)
    assert answer.texts == [want["candidates"]] == [text[: text.find(stop)]]
    assert answer.finish_reasons == ["stop"]
    assert answer.usage.completion_tokens == want["completion_tokens"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_n_choices_for_each_prompt(server, loaded_model, stream):
    prompts = [PROMPT, "Hi"]
    answer = _ask(server, "sync", "completions", stream, prompt=prompts, n=2, **GREEDY)
    wants = [_predicted(loaded_model, p, **GREEDY) for p in prompts]
    assert answer.texts == [w["candidates"] for w in wants for _ in range(2)]
    # Each prompt's tokens count once, each choice's completion counts.
    assert answer.usage.prompt_tokens == sum(w["prompt_tokens"] for w in wants)
    assert answer.usage.completion_tokens == 2 * sum(w["completion_tokens"] for w in wants)


def test_a_seed_repeats_a_sampled_answer_streamed_or_not(server):
    sampled = {"temperature": 1.0, "max_tokens": 8, "seed": 7, "n": 2}
    first = _ask(server, "sync", "chat", False, prompt=PROMPT, **sampled)
    assert _ask(server, "sync", "chat", False, prompt=PROMPT, **sampled).texts == first.texts
    assert _ask(server, "async", "chat", True, prompt=PROMPT, **sampled).texts == first.texts


def test_a_system_message_opens_the_instruction_of_a_model_without_a_system_prompt(client, loaded_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    response = client.chat.completions.create(model=NAME, messages=messages, **GREEDY)
    want = _predicted(loaded_model, f"Be brief.\n\n{PROMPT}", **GREEDY)["candidates"]
    assert response.choices[0].message.content == want


def _nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


BAD = {
    "temperature above 2": ({"temperature": 3}, "temperature", "less than or equal to 2"),
    "max_tokens above the model's limit": ({"max_tokens": 5000}, "max_tokens", "max_tokens_limit"),
    "max_completion_tokens above the limit": ({"max_completion_tokens": 5000, "max_tokens": None}, "max_completion_tokens",
                                              "max_tokens_limit"),
    "n above the server's limit": ({"n": 100}, "n", "--max-n"),
    "top_p of 0": ({"top_p": 0}, "top_p", "greater than 0"),
    "an empty stop string": ({"stop": [""]}, "stop", "at least 1 character"),
    "logprobs": ({"logprobs": True}, "logprobs", "not supported"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    "logit_bias": ({"logit_bias": {"1": 5}}, "logit_bias", "not supported"),
    "an unknown field": ({"extra_body": {"bogus": 1}}, "bogus", "unrecognized request argument"),
    "a template variable the model lacks": ({"extra_body": {"template_variables": {"context": "x"}}},
                                            "template_variables", "has no template variables"),
    "a conversation to an instruction model": (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": PROMPT}]}, "messages", "instruction model"),
    "a schema that cannot be enforced": (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
        "response_format", "Invalid type: strin"),
    "an image": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                 "messages.0.content", "only text"),
    "stream not a boolean": ({"extra_body": {"stream": "yes"}}, "stream", "valid boolean"),
    "stream_options without stream": ({"stream_options": {"include_usage": True}}, "stream_options",
                                      "only allowed with 'stream': true"),
    "an unknown field of a message": ({"messages": [{"role": "user", "content": PROMPT, "mood": "x"}]},
                                      "messages.0.mood", "it takes ['annotations', 'audio', 'content'"),
    "a user message without content": ({"messages": [{"role": "user", "content": None}]}, "messages.0",
                                       "needs 'content'"),
    "a refusal in a user message": ({"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]},
                                    "messages.0", "a refusal is an assistant's"),
    "a schema nested too deeply": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "deep", "schema": _nested(150)}}}, "response_format", "at most 128 are allowed"),
    "the system prompt twice": ({"messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": PROMPT}],
                                 "extra_body": {"template_variables": {"system": "Be long."}}},
                                "template_variables", "sets the system prompt twice"),
    "a message too long for any context": ({"messages": [{"role": "user", "content": "river " * 40000}]},
                                           "messages", "characters after templating"),
    "an empty content list": ({"messages": [{"role": "user", "content": []}]}, "messages.0",
                              "content is an empty list"),
    "max_tokens and max_completion_tokens differing": ({"max_completion_tokens": 3}, "max_completion_tokens",
                                                       "max_tokens (4) and max_completion_tokens (3) differ"),
    "max_completion_tokens over the context": (
        {"messages": [{"role": "user", "content": "river " * 1500}], "max_completion_tokens": 1000, "max_tokens": None},
        "max_completion_tokens", "with max_completion_tokens=1000 that exceeds"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_request_is_a_400_naming_the_param(client, case):
    fields, param, says = BAD[case]
    body = {"model": NAME, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(**body)
    assert raised.value.param == param
    assert says in raised.value.message


def test_a_message_with_a_lone_surrogate_is_a_400_naming_messages(server):
    # JSON may escape one ("\ud800"); the openai client cannot send it, so the body is written by hand.
    body = f'{{"model": "{NAME}", "max_tokens": 4, "messages": [{{"role": "user", "content": "a\\ud800b"}}]}}'
    response = requests.post(f"{server}/v1/chat/completions", data=body, timeout=60,
                             headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "messages" and "not valid Unicode" in error["message"]


def test_invocations_without_a_content_type_is_mlflows_415_not_a_500(server):
    # MLflow's scoring app fails on a missing Content-Type with an AttributeError (a 500).
    response = requests.post(f"{server}/invocations", data=b'{"inputs": ["hi"]}', timeout=60,
                             headers={"Authorization": f"Bearer {KEY}"})  # bytes: no Content-Type sent
    assert "content-type" not in {k.lower() for k in response.request.headers}
    assert response.status_code == 415 and "only supports the following content types" in response.text
    assert "application/json" in response.text


def test_null_fields_take_their_defaults_and_any_int64_seed_repeats(client):
    # The openai client sends null for an optional field a caller set to None.
    response = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}],
                                              n=None, stream=None, **GREEDY)
    assert len(response.choices) == 1 and response.choices[0].message.content
    for seed in (-5, 2**63 - 1):  # choice 1 of the largest seed wraps round to 0
        sampled = {"temperature": 1.0, "max_tokens": 6, "seed": seed, "n": 2}
        texts = [[c.message.content for c in client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": PROMPT}], **sampled).choices] for _ in range(2)]
        assert texts[0] == texts[1]


def test_without_max_tokens_a_long_prompt_gets_what_the_context_leaves(client, loaded_model):
    # OpenAI's meaning of an omitted max_tokens, not a 400 naming a max_tokens never sent.
    python_model = loaded_model.unwrap_python_model()
    context = python_model.tokens.context_length
    prompt_tokens = len(python_model.tokens.encode(python_model.render(["river " * 100]), 1)[0][0])
    prompt = "river " * (100 + context - prompt_tokens - 6)  # a token per word: 6 left
    response = client.completions.create(model=NAME, prompt=prompt, temperature=0.0)
    assert 1 <= response.usage.completion_tokens <= 6
    assert response.usage.prompt_tokens + response.usage.completion_tokens <= context


def test_harmless_fields_are_accepted(client):
    response = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": PROMPT}], user="u-1", metadata={"k": "v"},
        logprobs=False, frequency_penalty=0, response_format={"type": "text"}, **GREEDY)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_a_json_schema_response_format_holds_the_answer_to_it(server):
    schema = {"type": "object", "properties": {"river": {"type": "string", "maxLength": 10},
                                               "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["river", "rank"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "river", "schema": schema, "strict": True}}
    for stream in (False, True):
        answer = _ask(server, "sync", "chat", stream, prompt=PROMPT, response_format=response_format,
                      temperature=0.0, max_tokens=48)
        jsonschema.validate(json.loads(answer.texts[0]), schema)
        assert answer.finish_reasons == ["stop"]


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    assert raised.value.code == "model_not_found" and NAME in raised.value.message


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_refused_prompt_of_a_list_is_named_by_its_place(client, stream):
    with pytest.raises(openai.BadRequestError, match=r"prompt at row 1 is \d+ tokens after templating") as raised:
        client.completions.create(model=NAME, prompt=["Hi", "river " * 3000], max_tokens=4, stream=stream)
    assert raised.value.param == "prompt"
    with pytest.raises(openai.BadRequestError, match=r"the prompt at row 1 is \d+ tokens after templating; "
                       r"with max_tokens=1000 that exceeds") as raised:
        client.completions.create(model=NAME, prompt=["Hi", "river " * 1500], max_tokens=1000, stream=stream)
    assert raised.value.param == "max_tokens"


def test_null_template_variables_take_the_defaults(client):
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 3, "temperature": 0.0}
    assert client.completions.create(**body, extra_body={"template_variables": None}).choices[0].text == \
        client.completions.create(**body).choices[0].text


def test_ping_answered_503_while_the_model_loaded_then_200(server):
    # The harness polled /ping from the server's start: uvicorn listens before the model is in.
    assert metric(server, 'templated_llm_requests_total{route="/ping",status="503"}') > 0
    assert metric(server, 'templated_llm_requests_total{route="/ping",status="200"}') > 0


def test_the_models_list_names_the_registered_model(client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_a_wrong_or_missing_key_is_a_401_on_v1_and_invocations(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    for path, body in (("/v1/models", None), ("/invocations", {"inputs": ["hi"]})):
        response = requests.request("POST" if body else "GET", f"{server}{path}", json=body, timeout=30)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert requests.get(f"{server}/ping", timeout=30).status_code == 200  # probes need no key
    answered = requests.post(f"{server}/invocations", json={"inputs": ["hi"], "params": {"max_tokens": 2}},
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert answered.status_code == 200 and len(answered.json()["predictions"]) == 1


def test_a_key_beyond_ascii_is_matched_as_the_client_sends_it():
    from templated_llm.serving.gate import Gate

    gate = Gate(None, None, api_key="clé-ü", max_body_bytes=1, available=lambda: None)
    sent = "Bearer clé-ü".encode()  # a header carries the key's UTF-8 bytes
    assert gate._authorized({"headers": [(b"authorization", sent)]})  # noqa: SLF001
    assert not gate._authorized({"headers": [(b"authorization", "Bearer clé-u".encode())]})  # noqa: SLF001


@pytest.mark.parametrize(("key", "environment", "says"), [
    ("", None, "--api-key is empty"),
    (None, "", f"{API_KEY_ENV} is empty"),
    (" key ", None, "--api-key is padded with spaces"),
])
def test_a_key_that_would_turn_auth_off_or_never_match_is_refused(monkeypatch, key, environment, says):
    from templated_llm.serving.config import ServerConfig

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    if environment is not None:
        monkeypatch.setenv(API_KEY_ENV, environment)
    with pytest.raises(ValueError, match=says):
        ServerConfig("models:/m/1", api_key=key)


@pytest.mark.parametrize(("timeout", "says"), [(float("inf"), "a finite number; received inf"),
                                                (float("nan"), "a finite number; received nan"),
                                                (0.0, "positive; received 0.0")])
def test_a_timeout_that_is_not_a_positive_number_of_seconds_is_refused(timeout, says):
    from templated_llm.serving.config import ServerConfig

    with pytest.raises(ValueError, match=f"request_timeout must be {says}"):
        ServerConfig("models:/m/1", request_timeout=timeout)


def test_the_503_of_a_server_not_ready_says_when_to_retry():
    from starlette.testclient import TestClient

    from templated_llm.serving.gate import Gate
    from templated_llm.serving.metrics import Metrics

    gate = Gate(None, Metrics(lambda: None), api_key=None, max_body_bytes=1,
                available=lambda: "the model is loading; retry in a moment")
    for path in ("/v1/models", "/invocations", "/ping"):
        response = TestClient(gate).get(path)
        assert (response.status_code, response.headers.get("retry-after")) == (503, "1"), path


def test_a_body_over_the_limit_is_a_413(server):
    response = requests.post(f"{server}/v1/completions", data=b"x" * (16 * 2**20 + 1),
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 413
    assert "--max-body-bytes" in response.json()["error"]["message"]


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v1/chat/completions", 405),
                                                         ("POST", "/v1/embeddings", 404)])
def test_other_v1_routes_answer_openai_errors(server, method, path, status):
    response = requests.request(method, f"{server}{path}", headers={"Authorization": f"Bearer {KEY}"},
                                timeout=30)
    assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_malformed_json_is_a_400(server):
    response = requests.post(f"{server}/v1/chat/completions", data=b'{"model": ',
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_streaming_really_streams(client):
    """With 128 new tokens the first text comes before a third of the whole time."""
    def first_text_share() -> float:
        start = time.perf_counter()
        first = None
        for chunk in client.completions.create(model=NAME, prompt=PROMPT, stream=True, temperature=0.0,
                                               max_tokens=128):
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
        return first / (time.perf_counter() - start)

    # The tiny model streams 128 tokens in a few tenths of a second, so one pause of the machine
    # (another test process, a collection) decides a single stream: the median of three, each
    # after a first untimed stream.
    first_text_share()
    shares = sorted(first_text_share() for _ in range(3))
    print(f"\nfirst text after {shares[1]:.1%} of the stream's time (of {shares})")
    assert shares[1] < 1 / 3


def test_metrics_count_requests_tokens_and_stream_latency(server, client):
    before = metric(server, "templated_llm_completion_tokens_total")
    list(client.completions.create(model=NAME, prompt=PROMPT, stream=True, **GREEDY))
    assert metric(server, "templated_llm_completion_tokens_total") > before
    text = requests.get(f"{server}/metrics", timeout=30).text
    for name in ('templated_llm_requests_total{route="/v1/completions",status="200"}',
                 "templated_llm_time_to_first_token_seconds_count",
                 "templated_llm_time_per_output_token_seconds_count",
                 "templated_llm_sequences_in_flight", "templated_llm_prompt_tokens_total"):
        assert name in text
    # The engine's own figures, read from its stats.
    for name in ("templated_llm_engine_running", "templated_llm_engine_waiting",
                 "templated_llm_engine_cache_tokens_used", "templated_llm_engine_tokens_generated",
                 "templated_llm_engine_time_to_first_token_p50"):
        assert name in text


def test_the_stream_is_server_sent_events(server):
    body = {"model": NAME, "prompt": PROMPT, "stream": True, **GREEDY}
    with requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = response.content.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert json.loads(events[-3].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
