"""``templated-llm serve`` under load: 32 concurrent streams, a client that leaves, fuzzed bodies,
and SIGTERM during streams. Real server processes on 127.0.0.1; no timings asserted."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time

import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openai_servers import metric, openai_server, server_process

pytestmark = pytest.mark.slow

NAME = "mpt-instruct"  # a model logged without registering: served under its plugin's model name
RSS_GROWTH_BOUND = 512 * 2**20


@pytest.fixture(scope="module")
def server(logged_model):
    with openai_server(logged_model.model_uri, "--max-n", "3") as url:
        yield url


def _predict(model, prompt: str, **params) -> dict:
    [row] = model.predict([prompt], params={**params, "return_usage": True}).to_dict("records")
    return row


def _mixed_request(i: int) -> dict:
    """Client ``i``'s request: chat or completions, greedy or seeded sampling, various lengths,
    some with a stop string, some with two choices, some with usage."""
    body = {"prompt": f"Name {i} rivers.", "max_tokens": 2 + i % 7, "temperature": 0.0}
    if i % 3 == 0:
        body.update(temperature=0.8, seed=i)
    if i % 5 == 0:
        body["stop"] = ["e"]
    if i % 8 == 0:
        body["n"] = 2
    if i % 2:
        body["stream_options"] = {"include_usage": True}
    return body


async def _stream(client: openai.AsyncOpenAI, chat: bool, body: dict) -> tuple[list[str], list[str], object]:
    body = dict(body)
    if chat:
        body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
        response = await client.chat.completions.create(model=NAME, stream=True, **body)
    else:
        response = await client.completions.create(model=NAME, stream=True, **body)
    texts, finish, usage = {}, {}, None
    async for chunk in response:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text = choice.delta.content if chat else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (text or "")
            finish.update({choice.index: choice.finish_reason} if choice.finish_reason else {})
    return [texts[i] for i in sorted(texts)], [finish[i] for i in sorted(finish)], usage


def test_32_concurrent_streaming_clients_with_mixed_settings_all_get_their_answer(server, loaded_model):
    bodies = [_mixed_request(i) for i in range(32)]

    async def everyone() -> list:
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(_stream(client, i % 2 == 1, b) for i, b in enumerate(bodies)))

    answers = asyncio.run(everyone())
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    for i, (body, (texts, finish, usage)) in enumerate(zip(bodies, answers, strict=True)):
        n = body.get("n", 1)
        assert len(texts) == len(finish) == n, i
        if body["temperature"] == 0.0:
            want = _predict(loaded_model, body["prompt"], **{k: v for k, v in body.items()
                                                             if k in ("max_tokens", "temperature", "stop")})
            assert texts == [want["candidates"]] * n, i
            assert finish == [want["finish_reason"]] * n, i
        else:  # seeded: the same request, not streamed, samples the same
            whole = client.completions.create(model=NAME, **{k: v for k, v in body.items()
                                                             if k != "stream_options"})
            assert texts == [c.text for c in whole.choices], i
        if "stream_options" in body:
            assert usage.completion_tokens >= n and usage.total_tokens > usage.completion_tokens, i


def _read_events(response: requests.Response) -> list[str]:
    return [line.decode().removeprefix("data: ") for line in response.iter_lines() if line]


def test_a_client_that_leaves_after_two_chunks_frees_its_slot_and_others_are_unaffected(server, loaded_model):
    cancelled = metric(server, "templated_llm_sequences_cancelled_total")
    long = {"model": NAME, "prompt": "Write a long story.", "max_tokens": 1000, "temperature": 0.0,
            "stream": True}
    others = [{"model": NAME, "prompt": f"Name {i} cities.", "max_tokens": 6, "temperature": 0.0,
               "stream": True} for i in range(3)]
    results: dict[int, list[str]] = {}
    with requests.post(f"{server}/v1/completions", json=long, stream=True, timeout=120) as leaving:
        lines = leaving.iter_lines()
        chunks = [next(line for line in lines if line) for _ in range(2)]
        assert all(json.loads(c.removeprefix(b"data: "))["choices"] for c in chunks)
        # The others arrive while the long stream runs, then it leaves.
        threads = [threading.Thread(target=lambda i=i, body=body: results.update(
            {i: _read_events(requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=300))}))
            for i, body in enumerate(others)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
    for thread in threads:
        thread.join()
    for i, body in enumerate(others):
        want = _predict(loaded_model, body["prompt"], max_tokens=6, temperature=0.0)["candidates"]
        *text_events, done = results[i]
        assert done == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in text_events) == want
    # The slot is freed: nothing in flight, one cancelled (generating on, 1000 tokens would hold it).
    deadline = time.monotonic() + 120
    while metric(server, "templated_llm_sequences_in_flight") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(server, "templated_llm_sequences_in_flight") == 0
    assert metric(server, "templated_llm_sequences_cancelled_total") == cancelled + 1


# --- fuzzing ----------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
    st.sampled_from(["", "\x00", "\u202e", "\U0001f600", "\udcff", "<|endoftext|>", "{{ prompt }}",
                     "user", "system", "assistant", "tool", NAME, "text"]),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"]),
                               "content": st.one_of(st.text(max_size=30), scalars, json_values,
                                                    st.lists(st.fixed_dictionaries(
                                                        {"type": st.sampled_from(["text", "image_url"]),
                                                         "text": st.text(max_size=10)}), max_size=2))},
                              optional={"name": scalars, "tool_calls": json_values}),
        json_values,
    ),
    max_size=3,
)
fields = {
    "model": st.one_of(st.just(NAME), st.just(NAME), scalars),
    "max_tokens": st.one_of(st.integers(1, 2), st.integers(1, 2), st.integers(-2, 0), st.integers(1025, 10**20),
                            scalars),
    "temperature": st.one_of(st.floats(0, 2), scalars), "top_p": st.one_of(st.floats(0, 1), scalars),
    "n": st.one_of(st.integers(1, 2), st.integers(-1, 100), scalars),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=20), scalars),
    "seed": st.one_of(st.integers(0, 2**64), scalars), "stream": st.one_of(st.booleans(), scalars),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
    "logprobs": st.one_of(st.booleans(), scalars), "user": scalars, "metadata": json_values,
    "top_k": scalars, "repetition_penalty": st.one_of(st.floats(0, 3), scalars),
    "template_variables": json_values, "max_completion_tokens": st.one_of(st.integers(1, 2), scalars),
    "tools": json_values, "unknown": json_values,
}
required = {"max_tokens": fields["max_tokens"]}  # present, tiny, so valid bodies generate in milliseconds
optional = {k: v for k, v in fields.items() if k != "max_tokens"}
chat_bodies = st.fixed_dictionaries({**required, "messages": st.one_of(messages, json_values)}, optional=optional)
completion_bodies = st.fixed_dictionaries(
    {**required, "prompt": st.one_of(st.text(max_size=40), st.lists(st.text(max_size=20), max_size=4),
                                     json_values)}, optional=optional)
# Bodies a client would send, so that a good share of them generate.
sensible = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "n": st.integers(1, 2),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2), "seed": st.integers(0, 2**32),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": st.text(max_size=8), "max_completion_tokens": st.integers(1, 2),
}
sensible_chats = st.fixed_dictionaries(
    {"model": st.just(NAME), "max_tokens": st.integers(1, 2), "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=30)}), min_size=1, max_size=2)},
    optional=sensible)
sensible_completions = st.fixed_dictionaries(
    {"model": st.just(NAME), "max_tokens": st.integers(1, 2),
     "prompt": st.one_of(st.text(max_size=40), st.lists(st.text(max_size=20), min_size=1, max_size=2))},
    optional=sensible)


def _encode(document: object) -> bytes:
    return json.dumps(document, allow_nan=False).encode("utf-8", "surrogatepass")


bodies = st.one_of(
    st.tuples(st.just("chat/completions"), sensible_chats.map(_encode)),
    st.tuples(st.just("completions"), sensible_completions.map(_encode)),
    st.tuples(st.just("chat/completions"), chat_bodies.map(_encode)),
    st.tuples(st.just("completions"), completion_bodies.map(_encode)),
    # Truncated JSON, other documents and arbitrary bytes (invalid UTF-8 included).
    st.tuples(st.sampled_from(["chat/completions", "completions"]),
              st.one_of(st.tuples(chat_bodies.map(_encode), st.integers(1, 30)).map(lambda t: t[0][: -t[1]]),
                        json_values.map(_encode), st.binary(max_size=100))),
)


def test_fuzzed_bodies_never_get_a_5xx_and_the_server_survives(server):
    port = int(server.rsplit(":", 1)[1])
    valid = {"model": NAME, "prompt": "Hi", "max_tokens": 2}
    assert requests.post(f"{server}/v1/completions", json=valid, timeout=120).status_code == 200
    rss_before = server_process(port).memory_info().rss
    failures, statuses = [], {}

    @settings(max_examples=500, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(bodies)
    def send(case: tuple[str, bytes]) -> None:
        route, data = case
        response = requests.post(f"{server}/v1/{route}", data=data, timeout=120,
                                 headers={"Content-Type": "application/json"})
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500 or (response.status_code == 200 and b"data: {\"error\"" in response.content):
            failures.append((route, data[:300], response.status_code, response.text[:300]))

    send()
    after = requests.post(f"{server}/v1/completions", json=valid, timeout=120)
    rss_after = server_process(port).memory_info().rss
    print(f"\nfuzz: {sum(statuses.values())} bodies, statuses {dict(sorted(statuses.items()))}; "
          f"server RSS before {rss_before / 2**20:.0f} MiB, after {rss_after / 2**20:.0f} MiB")
    assert sum(statuses.values()) >= 500 and statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0
    assert failures == [], '\n'.join(map(str, failures))
    assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert rss_after - rss_before < RSS_GROWTH_BOUND


# --- shutdown ---------------------------------------------------------------------------------

def test_sigterm_during_streams_ends_them_cleanly_and_exits_0(logged_model):
    with openai_server(logged_model.model_uri, "--shutdown-timeout", "1") as url:
        process = server_process(int(url.rsplit(":", 1)[1]))
        body = {"model": NAME, "prompt": "Write a long story.", "max_tokens": 1000, "temperature": 0.0,
                "stream": True}
        ends: dict[int, object] = {}
        started = threading.Event()

        def stream(i: int) -> None:
            try:
                with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=120) as response:
                    events = []
                    for line in response.iter_lines():
                        if line:
                            events.append(line.decode().removeprefix("data: "))
                            started.set()
                    ends[i] = events[-2:]
            except requests.RequestException as exc:
                ends[i] = exc

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        assert started.wait(120)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(120)
        assert process.wait(60) == 0
    # Each stream ended with its last chunk if it finished in time, else the error the OpenAI
    # SDKs raise, then [DONE]; never a connection cut mid-event.
    assert len(ends) == 3
    for end in ends.values():
        assert isinstance(end, list) and end[1] == "[DONE]", end
        last = json.loads(end[0])
        assert last["choices"][0]["finish_reason"] == "length" if "choices" in last else \
            last["error"]["code"] == "shutting_down", end
    # 3 x 1,000 tokens take the tiny model several seconds: the shutdown cut some of them short.
    assert any("error" in json.loads(end[0]) for end in ends.values()), ends


def _idle(url: str) -> None:
    deadline = time.monotonic() + 120
    while metric(url, "templated_llm_sequences_in_flight") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(url, "templated_llm_sequences_in_flight") == 0


def test_a_request_past_the_timeout_is_cancelled_and_answered_504(logged_model, loaded_model):
    assert _predict(loaded_model, "Write a long story.", max_tokens=1000, temperature=0.0)[
        "finish_reason"] == "length"  # left to run, each request would write all 1,000 tokens
    # The tiny model writes 1,000 tokens in a few seconds: the timeout must be far shorter.
    with openai_server(logged_model.model_uri, "--request-timeout", "0.05") as url:
        body = {"model": NAME, "prompt": "Write a long story.", "max_tokens": 1000, "temperature": 0.0}
        whole = requests.post(f"{url}/v1/completions", json=body, timeout=300)
        assert whole.status_code == 504 and whole.json()["error"]["code"] == "timeout"
        with requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True,
                           timeout=300) as response:
            events = _read_events(response)
        # A 504 before the stream started, else its error event, then [DONE].
        error = events[-2] if events[-1] == "[DONE]" else events[-1]
        assert json.loads(error)["error"]["code"] == "timeout"
        # Both generations stopped on the engine (a whole completion too), not at max_tokens.
        _idle(url)
        assert metric(url, "templated_llm_sequences_cancelled_total") == 2
        before = metric(url, "templated_llm_engine_tokens_generated")
        assert before < 1000
        # MLflow's route answers 504 at its timeout (1 s, its least) while the generation it
        # cannot cancel goes on: the answer is not held back until that ends.
        rows = ["Write a long story."] * 8
        mlflow_route = requests.post(f"{url}/invocations", json={
            "inputs": rows, "params": {"max_tokens": 1000, "temperature": 0.0}}, timeout=300)
        assert mlflow_route.status_code == 504
        assert metric(url, "templated_llm_engine_tokens_generated") - before < 8 * 1000
        _idle(url)


def test_a_client_gone_while_its_text_is_held_back_stops_its_generation(logged_model, loaded_model):
    # Text that could still be a stop string's start is held back: the stream sends nothing, and
    # the server must cancel the sequence without waiting for a chunk to send.
    with openai_server(logged_model.model_uri) as url:
        alone = _predict(loaded_model, "hi", max_tokens=1000, temperature=0.0)
        assert alone["finish_reason"] == "length"  # left to run, it would write all 1,000 tokens
        body = {"model": NAME, "prompt": "hi", "max_tokens": 1000, "temperature": 0.0,
                "stream": True, "stop": [alone["candidates"] + "never written"]}
        with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=300):
            time.sleep(0.5)  # leaves with nothing read
        _idle(url)
        assert metric(url, "templated_llm_sequences_cancelled_total") == 1
        assert metric(url, "templated_llm_engine_tokens_generated") < 1000


def test_a_client_gone_before_its_whole_completion_is_ready_stops_its_generation(logged_model, loaded_model):
    with openai_server(logged_model.model_uri) as url:
        assert _predict(loaded_model, "Write a long story.", max_tokens=1000, temperature=0.0)[
            "finish_reason"] == "length"  # left to run, it would write all 1,000 tokens
        body = json.dumps({"model": NAME, "prompt": "Write a long story.", "max_tokens": 1000,
                           "temperature": 0.0}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as client:
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
            deadline = time.monotonic() + 60
            while metric(url, "templated_llm_engine_tokens_generated") == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        # The client left (no answer read); the server noticed and stopped the sequence.
        _idle(url)
        assert metric(url, "templated_llm_sequences_cancelled_total") == 1
        assert metric(url, "templated_llm_engine_tokens_generated") < 1000
        assert 'status="499"' in requests.get(f"{url}/metrics", timeout=30).text


def test_a_request_that_can_never_fit_is_a_400_and_refusals_are_not_cancellations(logged_model):
    with openai_server(logged_model.model_uri, "--max-pending", "2") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        # More choices than the server ever generates at once: a 429 would be retried in vain.
        with pytest.raises(openai.BadRequestError, match="--max-pending") as raised:
            client.completions.create(model=NAME, prompt="Hi", n=3, max_tokens=2)
        assert raised.value.param == "n"
        # Refused by the model after the server took it: counted as no cancellation.
        with pytest.raises(openai.BadRequestError, match="max_tokens_limit"):
            client.completions.create(model=NAME, prompt="Hi", n=2, max_tokens=5000)
        assert metric(url, "templated_llm_sequences_cancelled_total") == 0
        assert metric(url, "templated_llm_sequences_in_flight") == 0
        # Two sequences generating fill the server: the next request is a 429 to retry later.
        # Greedy: these run all 1,000 tokens (the timeout test checks it), holding both places.
        body = {"model": NAME, "prompt": "Write a long story.", "max_tokens": 1000, "n": 2, "stream": True,
                "temperature": 0.0}
        for _ in range(5):
            holder = threading.Thread(target=lambda: _read_events(requests.post(
                f"{url}/v1/completions", json=body, stream=True, timeout=300)))
            holder.start()
            deadline = time.monotonic() + 60
            while metric(url, "templated_llm_sequences_in_flight") < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            refused = requests.post(f"{url}/v1/completions", json={**body, "n": 1, "stream": False}, timeout=120)
            holder.join()
            if refused.status_code != 200:
                break
            # The holder ended before the request came in (a busy machine): again.
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert refused.headers["retry-after"] == "1"
