"""``predict_stream`` (transformers' streamer) and the optional usage columns."""

from __future__ import annotations

import time

import mlflow
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException

from templated_llm import log_llm
from templated_llm.runtime.completions import Completion, cut_at_stop, held_back_at_stop, stripped_stream
from templated_llm.runtime.tokens import IncrementalText

PROMPT = "Name three rivers."
GREEDY = {"temperature": 0.0, "max_tokens": 12}


@settings(max_examples=300)
@given(
    pieces=st.lists(st.text(alphabet="ab c\n", max_size=5), max_size=12),
    stop=st.lists(st.text(alphabet="ab c", min_size=1, max_size=3), max_size=3),
)
def test_held_back_chunks_join_to_the_text_cut_at_the_first_stop(pieces, stop) -> None:
    chunks = list(held_back_at_stop(iter(pieces), stop))
    assert "".join(chunks) == cut_at_stop("".join(pieces), stop)
    assert all(chunks)


@settings(max_examples=300)
@given(pieces=st.lists(st.text(alphabet="ab \n\t", max_size=5), max_size=12))
def test_stripped_chunks_join_to_the_stripped_text_and_none_is_empty(pieces) -> None:
    text = "".join(pieces)
    whole = Completion(text, prompt_tokens=3, completion_tokens=len(pieces), finish_reason="stop")
    *chunks, completion = list(stripped_stream(iter([*pieces, whole])))
    assert "".join(chunks) == text.strip() and all(chunks)
    assert completion == Completion(text.strip(), 3, len(pieces), "stop")


def test_streamed_chunks_join_to_the_predicted_text(loaded_model) -> None:
    expected = loaded_model.predict([PROMPT], params=GREEDY)["candidates"][0]
    chunks = list(loaded_model.predict_stream(PROMPT, params=GREEDY))
    assert len(chunks) > 1 and all(isinstance(c, str) for c in chunks)
    assert "".join(chunks) == expected


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_a_stop_string_ends_the_stream_where_it_ends_predict(loaded_model, data) -> None:
    text = loaded_model.predict([PROMPT], params=GREEDY)["candidates"][0]
    start = data.draw(st.integers(0, len(text) - 2))
    stop = text[start : start + data.draw(st.integers(1, 3))]
    params = {**GREEDY, "stop": [stop]}
    streamed = "".join(loaded_model.predict_stream(PROMPT, params=params))
    assert streamed == loaded_model.predict([PROMPT], params=params)["candidates"][0]
    assert streamed == text[: text.find(stop)]


@pytest.mark.parametrize("stop", [None, "slice"], ids=["no-stop", "stop"])
def test_generate_stream_ends_with_the_completion_predict_returns(loaded_model, stop) -> None:
    params = {**GREEDY, "return_usage": True}
    if stop:
        text = loaded_model.predict([PROMPT], params=GREEDY)["candidates"][0]
        params["stop"] = [text[4:6]]
    [expected] = loaded_model.predict([PROMPT], params=params).to_dict("records")
    *chunks, completion = loaded_model.unwrap_python_model().generate_stream(PROMPT, params)
    assert "".join(chunks) == completion.text == expected["candidates"]
    assert (completion.prompt_tokens, completion.completion_tokens, completion.finish_reason) == (
        expected["prompt_tokens"], expected["completion_tokens"], expected["finish_reason"])
    assert completion.finish_reason == ("stop" if stop else "length")


def test_a_whole_batch_stream_with_a_stop_string_decodes_each_token_once(fallback_model, monkeypatch) -> None:
    # The stop-string check and the text sent read one decode of each token.
    params = {**GREEDY, "stop": ["no such text"]}
    expected = fallback_model.predict([PROMPT], params=params)["candidates"][0]
    read = []
    update = IncrementalText.update

    def counted(self, tokenizer, ids):
        read.append(len(ids))
        return update(self, tokenizer, ids)

    monkeypatch.setattr(IncrementalText, "update", counted)
    *chunks, completion = fallback_model.unwrap_python_model().generate_stream(PROMPT, params)
    assert "".join(chunks) == completion.text == expected
    assert read == list(range(1, completion.completion_tokens + 1))


def test_closing_a_stream_early_frees_its_slot(loaded_model) -> None:
    engine = loaded_model.unwrap_python_model().engine
    before = engine.stats().tokens_generated
    stream = loaded_model.predict_stream(PROMPT, params={**GREEDY, "max_tokens": 200})
    next(stream)
    stream.close()
    # The sequence was cancelled: its slot is freed at the engine's next step.
    deadline = time.monotonic() + 30
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().running == 0
    assert engine.stats().tokens_generated - before < 200


def test_closing_a_whole_batch_stream_early_stops_the_generation_and_frees_the_model(fallback_model) -> None:
    params = {**GREEDY, "max_tokens": 300}
    usage = fallback_model.predict([PROMPT], params={**params, "return_usage": True})
    assert usage["finish_reason"].tolist() == ["length"]  # left alone, it runs all 300 steps
    python_model = fallback_model.unwrap_python_model()
    steps = []
    hook = python_model.model.register_forward_pre_hook(lambda *args: steps.append(1))
    try:
        stream = fallback_model.predict_stream(PROMPT, params=params)
        next(stream)
        stream.close()
    finally:
        hook.remove()
    # close() returns once the generation thread has ended: it ended early, cancelled.
    assert len(steps) < 300
    # ... and let go of the model: predict does not wait on it.
    lock = python_model._batcher.lock
    assert lock.acquire(timeout=30)
    lock.release()


def test_stream_takes_one_prompt_and_validates_params(loaded_model) -> None:
    python_model = loaded_model.unwrap_python_model()
    with pytest.raises(MlflowException, match="one prompt or conversation; received 2"):
        python_model.predict_stream(None, ["a", "b"], GREEDY)
    with pytest.raises(MlflowException, match="max_tokens"):
        python_model.predict_stream(None, ["a"], {"max_tokens": 0})
    # It was ignored: the stream is text, so asking for token counts there is a mistake to say.
    with pytest.raises(MlflowException, match="param 'return_usage': predict_stream yields the text only"):
        python_model.predict_stream(None, ["a"], {**GREEDY, "return_usage": True})
    assert "".join(python_model.predict_stream(None, ["a"], {**GREEDY, "return_usage": False})) == \
        loaded_model.predict(["a"], GREEDY)["candidates"][0]
    # Through MLflow's wrapper, a list of several is refused before the model sees it, with
    # MLflow's own code (docs/chat-and-streaming.md says so); a dict of several is the model's 400.
    for several in (["a", "b"], []):
        with pytest.raises(MlflowException, match="'predict_stream' requires single input") as caught:
            list(loaded_model.predict_stream(several, params=GREEDY))
        assert caught.value.error_code == "INTERNAL_ERROR"
    with pytest.raises(MlflowException, match="one prompt or conversation; received 2") as caught:
        list(loaded_model.predict_stream({"prompt": ["a", "b"]}, params=GREEDY))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_chat_messages_stream_too(tiny_model) -> None:
    model = mlflow.pyfunc.load_model(log_llm("llama2-chat", snapshot=tiny_model("llama"), name="s").model_uri)
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    expected = model.predict(chat, params=GREEDY)["candidates"][0]
    assert "".join(model.predict_stream(chat, params=GREEDY)) == expected


def test_usage_counts_tokens_and_says_why_each_row_ended(loaded_model) -> None:
    prompts = [PROMPT, "Hi"]
    plain = loaded_model.predict(prompts, params=GREEDY)
    assert list(plain.columns) == ["candidates"]  # the default output is unchanged
    out = loaded_model.predict(prompts, params={**GREEDY, "return_usage": True})
    assert list(out.columns) == ["candidates", "prompt_tokens", "completion_tokens", "finish_reason"]
    assert out["candidates"].tolist() == plain["candidates"].tolist()
    python_model = loaded_model.unwrap_python_model()
    rendered = python_model.render(prompts)
    assert out["prompt_tokens"].tolist() == [len(python_model.tokenizer(t).input_ids) for t in rendered]
    for _, row in out.iterrows():
        assert 1 <= row.completion_tokens <= GREEDY["max_tokens"]
        assert row.finish_reason == ("length" if row.completion_tokens == GREEDY["max_tokens"] else "stop")
    stop = out["candidates"][0][3:5]
    stopped = loaded_model.predict([PROMPT], params={**GREEDY, "stop": [stop], "return_usage": True})
    assert stopped["finish_reason"].tolist() == ["stop"]
    assert stopped["completion_tokens"][0] < GREEDY["max_tokens"]


@pytest.mark.parametrize("drop", ["close", "del"])
def test_a_stream_closed_or_dropped_unread_cancels_its_sequence(loaded_model, drop) -> None:
    # A generator closed before its first item runs no cleanup of its own: the engine would
    # generate all 200 tokens for nobody.
    python_model = loaded_model.unwrap_python_model()
    params = {**GREEDY, "max_tokens": 200}
    # MLflow's own predict_stream starts nothing before it is read; ours queue the sequence.
    for start in (lambda: python_model.predict_stream(None, PROMPT, params),
                  lambda: python_model.generate_stream(PROMPT, params)):
        before = python_model.engine.stats().tokens_generated
        stream = start()
        if drop == "close":
            stream.close()
        else:
            del stream
        deadline = time.monotonic() + 30
        while (stats := python_model.engine.stats()).running + stats.waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stats.running + stats.waiting == 0
        assert stats.tokens_generated - before < 200


def test_a_whole_batch_stream_cancelled_says_so_and_its_trace_is_an_error(fallback_model) -> None:
    # Cut short, it is neither "length" (max_tokens reached) nor a success.
    stream = fallback_model.unwrap_python_model().generate_stream(
        "Cancel three rivers.", {**GREEDY, "max_tokens": 200})
    next(stream)
    stream.cancel()
    *_, completion = list(stream)
    assert completion.finish_reason == "cancelled" and completion.completion_tokens < 200
    [trace] = [t for t in mlflow.search_traces(return_type="list", max_results=20, flush=True)
               if "Cancel three rivers." in (t.info.request_preview or "")]
    assert trace.info.state == "ERROR"


def test_an_omitted_max_tokens_fits_the_whole_batch_cache_budget(tiny_snapshot) -> None:
    info = log_llm("mpt-instruct", snapshot=tiny_snapshot, name="small-budget", engine=False)
    model = mlflow.pyfunc.load_model(info.model_uri, model_config={"max_cache_tokens": 600})
    python_model = model.unwrap_python_model()
    assert python_model.cache_tokens == 600  # 3 rows of the default 256 would not fit
    completions = python_model.complete(["a", "b", "c"], {"temperature": 0.0})
    longest = max(c.prompt_tokens for c in completions)
    assert all(c.completion_tokens <= 600 // 3 - longest for c in completions)


@pytest.mark.parametrize("engine", [True, False])
def test_a_stream_without_text_gives_the_completion_alone(loaded_model, fallback_model, engine) -> None:
    model = loaded_model if engine else fallback_model
    params = {**GREEDY, "return_usage": True}
    [expected] = model.predict([PROMPT], params=params).to_dict("records")
    stream = model.unwrap_python_model().generate_stream(PROMPT, GREEDY, text=False)
    [completion] = list(stream)
    assert (completion.text, completion.completion_tokens, completion.finish_reason) == (
        expected["candidates"], expected["completion_tokens"], expected["finish_reason"])
