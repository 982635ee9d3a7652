"""predict and predict_stream through the engine: same answers as whole-batch generate."""

from __future__ import annotations

import json
import logging
import shutil
import time

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from templated_llm import hookimpl, log_llm, register_plugin
from templated_llm.plugins.manager import unregister_plugin
from templated_llm.engine import adapters
from templated_llm.engine.config import EngineConfig
from templated_llm.errors import ConfigError

PROMPTS = ["Name three rivers.", "Explain the KV cache in simple words in simple words.", "hi",
           "Write a sentence about the sea and the mountains"]


def _until_idle(engine) -> None:
    deadline = time.monotonic() + 30
    while engine.stats().running + engine.stats().waiting and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("params", [
    {"temperature": 0.0, "max_tokens": 12},
    {"temperature": 0.0, "max_tokens": 20, "stop": ["ay", " b"], "return_usage": True},
    {"temperature": 0.0, "max_tokens": 9, "repetition_penalty": 1.4, "return_usage": True},
    # Stop strings that span the end of the prompt ("### Response:\n") and a first token that
    # starts with a space: only the generated text may hold them.
    {"temperature": 0.0, "max_tokens": 8, "stop": ["\n ", ":\n "], "return_usage": True},
])
def test_predict_on_the_engine_equals_whole_batch_generate(loaded_model, fallback_model, params):
    engine = loaded_model.unwrap_python_model().engine
    assert engine is not None and fallback_model.unwrap_python_model().engine is None
    before = engine.stats().tokens_generated
    on_engine = loaded_model.predict(pd.DataFrame({"prompt": PROMPTS}), params=params)
    # Row by row: in a whole batch, generate pads a row a stop string ended with the end token,
    # which the fallback path counts as one more completion token; alone it counts exactly.
    alone = pd.concat([fallback_model.predict([p], params=params) for p in PROMPTS], ignore_index=True)
    pd.testing.assert_frame_equal(on_engine, alone)
    assert engine.stats().tokens_generated > before


def test_a_whole_batch_held_to_a_schema_ends_a_row_on_its_stop_string(loaded_model, fallback_model):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    params = {"temperature": 0.0, "max_tokens": 12,
              "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}
    first, second = fallback_model.predict(PROMPTS[:2], params=params)["candidates"]
    # A stop string only the second answer holds: that row ends, and generate pads it while
    # the first goes on (the padding is no token of its grammar).
    stop = next(second[i : i + 2] for i in range(len(second) - 1) if second[i : i + 2] not in first)
    stopped = fallback_model.predict(PROMPTS[:2], params={**params, "stop": [stop]})
    assert stopped["candidates"].tolist() == [first, second[: second.index(stop)]]
    pd.testing.assert_frame_equal(stopped, loaded_model.predict(PROMPTS[:2], params={**params, "stop": [stop]}))


def test_a_full_engine_refuses_with_429_and_frees_what_it_queued(logged_model):
    model = mlflow.pyfunc.load_model(logged_model.model_uri,
                                     model_config={"max_num_seqs": 1, "max_waiting": 1})
    engine = model.unwrap_python_model().engine
    assert engine.max_num_seqs == 1
    # A stream holds the one slot: of two more rows, one may wait and the other is refused.
    holder = model.predict_stream(PROMPTS[0], params={"temperature": 0.0, "max_tokens": 1000})
    next(holder)
    with pytest.raises(MlflowException, match=r"max_waiting=1") as raised:
        model.predict(PROMPTS[1:3], params={"temperature": 0.0, "max_tokens": 40})
    assert raised.value.get_http_status_code() == 429
    deadline = time.monotonic() + 30
    while engine.stats().waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().waiting == 0  # the row that had a place in the queue left it
    assert engine.stats().running == 1  # beside the stream, which goes on
    holder.close()
    _until_idle(engine)
    assert engine.stats().running == 0
    assert model.predict(PROMPTS[:1], params={"max_tokens": 3})["candidates"][0]


def test_rows_that_free_slots_take_are_not_counted_as_waiting(logged_model):
    model = mlflow.pyfunc.load_model(logged_model.model_uri,
                                     model_config={"max_num_seqs": 4, "max_cache_tokens": 4 * 96, "max_waiting": 1})
    # Four rows take the four idle slots and a fifth waits: nothing is over the queue.
    assert len(model.predict(PROMPTS + ["Name a sea."], params={"temperature": 0.0, "max_tokens": 3})) == 5
    # More rows than the engine ever holds: a 400, never a 429 to retry in vain.
    with pytest.raises(MlflowException, match=r"6 rows; this model's engine holds at most 5 sequences") as raised:
        model.predict(PROMPTS + ["Name a sea.", "Name a lake."], params={"max_tokens": 3})
    assert raised.value.get_http_status_code() == 400


def test_a_request_over_a_slot_is_refused_naming_the_engine_budget(logged_model):
    model = mlflow.pyfunc.load_model(logged_model.model_uri,
                                     model_config={"max_num_seqs": 2, "max_cache_tokens": 64})
    with pytest.raises(MlflowException, match=r"max_cache_tokens / max_num_seqs\) of 32 tokens"):
        model.predict(PROMPTS[:1], params={"max_tokens": 30})


def test_log_llm_records_the_engine_budget(tiny_snapshot):
    info = log_llm("mpt-instruct", snapshot=tiny_snapshot, name="budget",
                   engine=EngineConfig(max_num_seqs=3, max_cache_tokens=300, prefill_chunk=16,
                                       prefill_order="arrival"))
    engine = mlflow.pyfunc.load_model(info.model_uri).unwrap_python_model().engine
    assert (engine.max_num_seqs, engine.max_seq_len, engine.config.prefill_chunk,
            engine.config.prefill_order) == (3, 100, 16, "arrival")
    reloaded = mlflow.pyfunc.load_model(info.model_uri, model_config={"prefill_order": "shortest"})
    assert reloaded.unwrap_python_model().engine.config.prefill_order == "shortest"
    with pytest.raises(ConfigError, match="prefill_order.*'shortest' or 'arrival'.*'random'"):
        mlflow.pyfunc.load_model(info.model_uri, model_config={"prefill_order": "random"})


def test_a_model_without_an_adapter_falls_back_to_whole_batches(tiny_model, monkeypatch, caplog):
    monkeypatch.setattr(adapters, "HF_MODEL_TYPES", frozenset())
    info = log_llm("llama2-chat", snapshot=tiny_model("llama"), name="no-adapter")
    with caplog.at_level(logging.INFO, logger="templated_llm.runtime.pyfunc"):
        model = mlflow.pyfunc.load_model(info.model_uri)
    assert model.unwrap_python_model().engine is None
    assert [r.message for r in caplog.records].count(next(
        r.message for r in caplog.records if "no continuous-batching adapter" in r.message)) == 1
    assert model.predict(["hi"], params={"max_tokens": 3})["candidates"][0] is not None


def test_without_max_tokens_a_long_prompt_gets_what_the_context_leaves(logged_model):
    # OpenAI's meaning of an omitted max_tokens: the default, or less where the context is short.
    model = mlflow.pyfunc.load_model(logged_model.model_uri,
                                     model_config={"max_num_seqs": 2, "max_cache_tokens": 2 * 96})
    python_model = model.unwrap_python_model()
    prompt = PROMPTS[0]
    prompt_tokens = len(python_model.tokens.encode(python_model.render([prompt]), 1)[0][0])
    [completion] = python_model.complete([prompt], {"temperature": 0.0})
    assert completion.prompt_tokens == prompt_tokens
    assert completion.completion_tokens <= 96 - prompt_tokens
    assert completion.finish_reason == "length" or completion.completion_tokens < 96 - prompt_tokens
    # Each row is fitted on its own: a short prompt is not held to what a long one leaves.
    short, long = "hi", "river " * 25
    short_tokens, long_tokens = (len(ids) for ids in python_model.tokens.encode(python_model.render([short, long]), 1)[0])
    assert short_tokens < long_tokens < 90
    completions = python_model.complete([short, long], {"temperature": 0.0})
    assert [c.completion_tokens for c in completions] == [96 - short_tokens, 96 - long_tokens]  # greedy: no end token
    assert [c.finish_reason for c in completions] == ["length", "length"]
    # A max_tokens the caller chose is never shrunk: refused as before.
    with pytest.raises(MlflowException, match=r"with max_tokens=256 that exceeds"):
        python_model.complete([prompt], {"temperature": 0.0, "max_tokens": 256})
    # A prompt that fills the context leaves nothing to fit: refused, naming the prompt alone.
    with pytest.raises(MlflowException, match=r"prompt at row 0 is \d+ tokens after templating; it fills "
                       r"what one sequence may hold .* leaves no room to generate") as raised:
        python_model.complete(["river " * 100], {})
    assert "max_tokens" not in raised.value.message


def test_longrope_rows_of_one_request_each_get_what_they_get_alone(tiny_model, tmp_path):
    # LongRoPE switches a whole pass to its long factors once the longest row passes 64
    # positions: in one batch, the short row would be rotated as the long one.
    snapshot = shutil.copytree(tiny_model("llama"), tmp_path / "longrope")
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 160, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64, "factor": 8.0,
        "short_factor": [1.0] * 8, "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]}}))
    # On the CPU (float32): the random weights then write no end token within the context.
    model = mlflow.pyfunc.load_model(log_llm("llama2-chat", snapshot=snapshot, name="longrope").model_uri,
                                     model_config={"device": "cpu"})
    assert model.unwrap_python_model().engine is None  # LongRoPE generates whole batches
    short, long = "hi", " ".join(["river", "sea", "model"] * 30)
    params = {"temperature": 0.0, "max_tokens": 8}
    together = model.predict([short, long], params=params)["candidates"].tolist()
    assert together == [model.predict([p], params=params)["candidates"][0] for p in (short, long)]
    # Without max_tokens, each row gets what its own length leaves in the context.
    fitted = model.predict([short, long], params={"temperature": 0.0, "return_usage": True})
    assert fitted["finish_reason"].tolist() == ["length", "length"]
    assert fitted["completion_tokens"].tolist() == [160 - n for n in fitted["prompt_tokens"]]


def test_a_checkpoints_generation_config_changes_neither_path(tiny_model, tmp_path, caplog):
    # Beam search, suppressed tokens, several sequences per prompt: generate would apply them
    # off the engine only (and num_return_sequences failed every request there).
    snapshot = shutil.copytree(tiny_model("llama"), tmp_path / "generation-config")
    (snapshot / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 1, "eos_token_id": 2, "num_beams": 3, "do_sample": True, "num_return_sequences": 2,
        "suppress_tokens": list(range(3, 300)), "top_k": 5, "temperature": 0.6}))
    prompts, params = ["Name three rivers.", "hi"], {"temperature": 0.0, "max_tokens": 8}
    with caplog.at_level(logging.INFO, logger="templated_llm.runtime.loading"):
        engine = mlflow.pyfunc.load_model(log_llm("llama2-chat", snapshot=snapshot, name="gc").model_uri)
    assert "num_beams=3" in caplog.text and "generation ignores them" in caplog.text
    whole = mlflow.pyfunc.load_model(log_llm("llama2-chat", snapshot=snapshot, name="gc-whole",
                                             engine=False).model_uri)
    expected = mlflow.pyfunc.load_model(log_llm("llama2-chat", snapshot=tiny_model("llama")).model_uri)
    want = expected.predict(prompts, params=params)["candidates"].tolist()
    assert engine.predict(prompts, params=params)["candidates"].tolist() == want
    assert whole.predict(prompts, params=params)["candidates"].tolist() == want
    sampled = {"temperature": 1.0, "max_tokens": 8, "seed": 3}
    assert len(whole.predict(prompts, params=sampled)) == 2


class _SuppressingPlugin:
    """Sets, in prepare_model, what generate would apply and the engine would not."""

    @hookimpl
    def prepare_model(self, spec, model, tokenizer):
        if spec.name == "llama2-chat":
            model.generation_config.update(suppress_tokens=list(range(3, 300)), num_beams=2)


def test_generation_fields_a_plugin_sets_at_load_change_neither_path(tiny_model, caplog):
    prompts, params = ["Name three rivers.", "hi"], {"temperature": 0.0, "max_tokens": 8}
    expected = mlflow.pyfunc.load_model(log_llm("llama2-chat", snapshot=tiny_model("llama")).model_uri)
    want = expected.predict(prompts, params=params)["candidates"].tolist()
    register_plugin(_SuppressingPlugin(), name="suppressing")
    try:
        with caplog.at_level(logging.WARNING, logger="templated_llm.runtime.loading"):
            engine, whole = (mlflow.pyfunc.load_model(log_llm("llama2-chat", snapshot=tiny_model("llama"),
                                                              engine=on).model_uri) for on in (True, False))
    finally:
        unregister_plugin("suppressing")
    assert "a plugin's prepare_model sets num_beams=2, suppress_tokens=" in caplog.text
    assert engine.predict(prompts, params=params)["candidates"].tolist() == want
    assert whole.predict(prompts, params=params)["candidates"].tolist() == want


def test_top_k_0_samples_from_the_whole_vocabulary_off_the_engine(fallback_model, monkeypatch):
    # Left unset, transformers fills in its own top_k of 50.
    import transformers.generation.utils as generation_utils

    built = []
    original = generation_utils.TopKLogitsWarper.__init__
    monkeypatch.setattr(generation_utils.TopKLogitsWarper, "__init__",
                        lambda self, top_k, *a, **k: (built.append(top_k), original(self, top_k, *a, **k))[1])
    fallback_model.predict(["hi"], params={"temperature": 1.0, "top_k": 0, "max_tokens": 2, "seed": 1})
    assert built == []
    fallback_model.predict(["hi"], params={"temperature": 1.0, "top_k": 5, "max_tokens": 2, "seed": 1})
    assert built == [5]


def test_a_dropped_model_frees_its_engine(logged_model):
    # MLflow keeps the model that the logged code set in a module global: the last model loaded
    # must not live on there (weights, KV cache and scheduler thread) once its user drops it.
    import gc
    import threading
    import weakref

    before = set(threading.enumerate())
    model = mlflow.pyfunc.load_model(logged_model.model_uri)
    model.predict(["Hi"], params={"max_tokens": 2})
    python_model = weakref.ref(model.unwrap_python_model())
    [thread] = [t for t in set(threading.enumerate()) - before if t.name == "templated-llm-engine"]
    del model
    gc.collect()
    assert python_model() is None
    thread.join(timeout=10)
    assert not thread.is_alive()
