"""The continuous-batching engine on tiny models: every request gets what it gets alone."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, MptForCausalLM

from templated_llm.engine import (
    CANCELLED,
    Engine,
    EngineConfig,
    EngineFullError,
    HuggingFaceAdapter,
    SequenceFailedError,
    SlotCache,
)
from templated_llm.engine import sampling
from templated_llm.engine.adapters import ENGINE_SDPA
from templated_llm.engine.sequence import SequenceState
from templated_llm.runtime.generation import generate_completions
from templated_llm.runtime.params import GenerationParams
from templated_llm.runtime.tokens import pad, prepare_tokenizer
from templated_llm_mpt.attention import install_attention
from templated_llm_mpt.engine import MptAdapter

PROMPTS = ["Name three rivers.", "hi", "Explain the attention layer of a language model in "
           "simple words in simple words, example 3.", "Write a sentence about the sea",
           "### Instruction: list the layers"]
WORDS = st.sampled_from(["river", "model", "the", "cache", "token", "a", "sea", "write", "fast"])


def _load(path, architecture: str, attention: str, dtype: torch.dtype = torch.float32):
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    if architecture == "mpt":
        model = MptForCausalLM.from_pretrained(path, dtype=dtype).eval()
        if attention != "eager":
            install_attention(model, attention)
        return model, tokenizer, MptAdapter(model, attention)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention, dtype=dtype).eval()
    return model, tokenizer, HuggingFaceAdapter(model)


@pytest.fixture(scope="module")
def mpt(tiny_snapshot):
    return _load(tiny_snapshot, "mpt", "sdpa")


def _engine(loaded, **config) -> Engine:
    model, tokenizer, adapter = loaded
    options = {"max_num_seqs": 3, "max_cache_tokens": 3 * 96, "prefill_chunk": 5} | config
    return Engine(model, tokenizer, adapter, EngineConfig(**options))


def _alone(loaded, ids: list[int], params: GenerationParams):
    """Today's path: transformers' generate on the one prompt."""
    model, tokenizer, _ = loaded
    return generate_completions(model, tokenizer, pad(tokenizer, [ids], "cpu"), params, "cpu")[0]


def _ids(loaded, text: str) -> list[int]:
    return loaded[1](text)["input_ids"]


def _wait_for_tokens(engine: Engine, count: int) -> None:
    """Until the engine has generated ``count`` tokens, or has nothing left to run."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.tokens_generated >= count or stats.running + stats.waiting == 0:
            return
        time.sleep(0.001)


@pytest.mark.parametrize("architecture", ["mpt", "llama", "mistral"])
def test_uneven_decode_steps_attend_per_row_and_match_generate(tiny_model, architecture, monkeypatch):
    from templated_llm.engine import adapters, attention
    from templated_llm_mpt import engine as mpt_engine

    calls = []

    def counted(*args, **kwargs):
        calls.append(len(args[3]))
        return attention.per_row(*args, **kwargs)

    monkeypatch.setattr(adapters if architecture != "mpt" else mpt_engine, "per_row", counted)
    # A tiny model's keys are a few hundred bytes, its padding never worth a call per row.
    monkeypatch.setattr(attention, "_PER_ROW_CALL_BYTES", 1)
    loaded = _load(tiny_model(architecture), architecture, "sdpa")
    # A long prompt decoding beside short ones: padding them all to its length would read
    # several times the keys the short ones attend.
    texts = [" ".join(["river"] * 40), "hi", "the sea"]
    requests = [(_ids(loaded, t), GenerationParams(max_tokens=6)) for t in texts]
    expected = [_alone(loaded, *r) for r in requests]
    engine = _engine(loaded, prefill_chunk=64)
    try:
        handles = [engine.submit(ids, params) for ids, params in requests]
        assert [h.result(timeout=120) for h in handles] == expected
    finally:
        engine.close()
    assert 3 in calls  # decode steps of all three rows went per row


def test_prefill_from_position_0_runs_sdpa_causal_without_a_mask(tiny_model, monkeypatch):
    from templated_llm.engine import adapters

    loaded = _load(tiny_model("llama"), "llama", "sdpa")
    ids, params = _ids(loaded, PROMPTS[2]), GenerationParams(max_tokens=4)
    expected = _alone(loaded, ids, params)
    passes = []  # (queries, whether a mask was given) of every prefill attention call
    original = adapters.sdpa_attention_forward

    def spy(module, query, key, value, mask, **kwargs):
        if query.shape[2] > 1:
            passes.append((query.shape[2], mask is not None))
        return original(module, query, key, value, mask, **kwargs)

    monkeypatch.setattr(adapters, "sdpa_attention_forward", spy)
    layers = loaded[0].config.num_hidden_layers
    for chunk, masked in ((64, [(len(ids), False)]), (8, [(8, False), *[(8, True)] * (len(ids) // 8 - 1)])):
        passes.clear()
        engine = _engine(loaded, prefill_chunk=chunk)
        try:
            assert engine.submit(ids, params).result(timeout=60) == expected
        finally:
            engine.close()
        # In one pass from position 0: causal; read in chunks, the later ones need the mask.
        assert passes[::layers][: len(masked)] == masked


@pytest.mark.parametrize("prefill_chunk", [16, 64])
@pytest.mark.parametrize("attention", ["sdpa", "eager", "sdpa per row"])
@pytest.mark.parametrize("architecture", ["mistral", "qwen2"])
def test_sliding_windows_apply_to_the_layers_that_have_them(tiny_model, architecture, attention, prefill_chunk,
                                                           monkeypatch):
    # Mistral windows every layer (2 key heads for 4 query heads); this Qwen2 only its second
    # (max_window_layers=1), the first seeing the whole context. Prompts and generations run
    # well past the window; the long prompt is read in chunks (16), or in one pass from
    # position 0 (64). "sdpa per row": every uneven decode step attends per row, windowed
    # layers over their window (a tiny model's padding is never worth it otherwise).
    from templated_llm.engine import adapters, attention as engine_attention

    calls, per_row = [], attention == "sdpa per row"
    if per_row:
        monkeypatch.setattr(engine_attention, "_PER_ROW_CALL_BYTES", 1)
        monkeypatch.setattr(adapters, "per_row", lambda *a, **k: calls.append(a[3]) or engine_attention.per_row(*a, **k))
        attention = "sdpa"
    loaded = _load(tiny_model(architecture, sliding_window=6, window_layers=1), architecture, attention)
    texts = [" ".join(["river", "sea", "model"] * 8), "hi", "the sea and the river"]
    requests = [(_ids(loaded, t), GenerationParams(max_tokens=12)) for t in texts]
    expected = [_alone(loaded, *r) for r in requests]
    engine = _engine(loaded, prefill_chunk=prefill_chunk)
    try:
        handles = [engine.submit(ids, params) for ids, params in requests]
        assert [h.result(timeout=120) for h in handles] == expected
    finally:
        engine.close()
    if per_row:  # windowed rows attended at most their last 6 keys
        assert calls and any(max(k.stop - k.start for k in keys) <= 6 < max(k.stop for k in keys) for keys in calls)


def test_mistral_with_layer_types_runs_as_ministral_on_the_engine(tiny_model, tmp_path):
    # transformers loads a Mistral config.json that lists layer_types as Ministral: windows on
    # the layers named sliding_attention only.
    snapshot = shutil.copytree(tiny_model("mistral", sliding_window=6), tmp_path / "ministral")
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps(
        {**config, "layer_types": ["sliding_attention", "full_attention"]}))
    loaded = _load(snapshot, "mistral", "sdpa")
    assert loaded[0].config.model_type == "ministral"
    assert HuggingFaceAdapter.supports(loaded[0], "sdpa")
    texts = [" ".join(["river", "sea", "model"] * 8), "hi", "the sea and the river"]
    requests = [(_ids(loaded, t), GenerationParams(max_tokens=12)) for t in texts]
    expected = [_alone(loaded, *r) for r in requests]
    engine = _engine(loaded, prefill_chunk=16)
    try:
        assert [h.result(timeout=120) for h in [engine.submit(*r) for r in requests]] == expected
    finally:
        engine.close()


def test_a_model_the_engine_runs_still_generates_padded_batches_with_transformers(tiny_model):
    # The engine names its own SDPA function in the model's config: transformers must still
    # build generate's masks for it (left padding here), as it does for plain sdpa.
    path = tiny_model("llama")
    model, tokenizer, _ = loaded = _load(path, "llama", "sdpa")
    assert model.config._attn_implementation == ENGINE_SDPA
    assert HuggingFaceAdapter(model).per_row  # a second engine on the model attends per row too
    plain = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    batch = pad(tokenizer, [_ids(loaded, "hi"), _ids(loaded, PROMPTS[2])], "cpu")
    params = GenerationParams(max_tokens=8)
    assert (generate_completions(model, tokenizer, batch, params, "cpu")
            == generate_completions(plain, tokenizer, batch, params, "cpu"))


@settings(max_examples=12)
@given(requests=st.lists(st.tuples(
    st.lists(WORDS, min_size=1, max_size=30).map(" ".join),
    st.integers(1, 12),  # max_tokens
    st.lists(st.sampled_from(["ay", " b", "e", "network", "xyz"]), max_size=2),  # stop
    st.integers(0, 20),  # arrives once the engine has generated this many tokens
), min_size=1, max_size=6))
def test_greedy_alone_equals_joined_at_any_step(mpt, requests):
    # Small slots and chunks: sequences wait, prompts are read in several chunks, and every
    # request joins the running batch at a step drawn for it. Equality is exact here: the tiny
    # models' argmaxes are clear (tiny.py); on a model with near ties a different batch shape
    # can flip a pick within the float tolerance docs/attention.md states.
    arrivals = sorted(requests, key=lambda r: r[3])
    runs = [(_ids(mpt, text), GenerationParams(max_tokens=max_tokens, stop=stop), arrival)
            for text, max_tokens, stop, arrival in arrivals]
    # Before the engine starts: the engine owns the model, nothing else may run it beside it.
    expected = [_alone(mpt, ids, params) for ids, params, _ in runs]
    engine = _engine(mpt)
    try:
        handles = []
        for ids, params, arrival in runs:
            _wait_for_tokens(engine, arrival)
            handles.append(engine.submit(ids, params))
        assert [h.result(timeout=120) for h in handles] == expected
    finally:
        engine.close()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_bfloat16_mpt_gives_short_sequences_their_own_text_beside_a_long_one(tiny_snapshot, attention):
    # ALiBi measured from the longest row of a pass put a short row's nearest keys near
    # -slope * 1500, where bfloat16 cannot tell them apart: its text changed with its neighbour.
    loaded = _load(tiny_snapshot, "mpt", attention, torch.bfloat16)
    params = GenerationParams(max_tokens=12)
    shorts = [_ids(loaded, text) for text in [*PROMPTS, "the model of a language", "three cities"]]
    expected = [_alone(loaded, ids, params) for ids in shorts]
    long = _ids(loaded, " ".join(["the river model cache"] * 400))[:1500]
    engine = _engine(loaded, max_num_seqs=2, max_cache_tokens=2 * 2048, prefill_chunk=2048)
    try:
        beside = engine.submit(long, GenerationParams(max_tokens=300))
        _wait_for_tokens(engine, 1)  # the long sequence is decoding
        assert [engine.submit(ids, params).result(timeout=120) for ids in shorts] == expected
        beside.cancel()
    finally:
        engine.close()


@pytest.mark.parametrize("architecture,attention", [
    ("mpt", "eager"), ("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"), ("gpt_neox", "sdpa"),
    ("qwen2", "sdpa"), ("qwen3", "eager"),
])
def test_every_family_and_backend_matches_generate(tiny_model, architecture, attention):
    loaded = _load(tiny_model(architecture), architecture, attention)
    engine = _engine(loaded)
    try:
        requests = [(_ids(loaded, p), GenerationParams(max_tokens=4 + 3 * i, stop=["e"] * (i % 2)))
                    for i, p in enumerate(PROMPTS)]
        handles = [engine.submit(ids, params) for ids, params in requests]
        assert [h.result(timeout=120) for h in handles] == [_alone(loaded, *r) for r in requests]
    finally:
        engine.close()


def test_seeded_sample_is_independent_of_its_neighbours(mpt):
    seeded = GenerationParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_tokens=16)
    ids = _ids(mpt, PROMPTS[0])
    engine = _engine(mpt, max_num_seqs=4, max_cache_tokens=4 * 96)
    try:
        alone = engine.submit(ids, seeded).result(timeout=60)
        neighbours = [engine.submit(_ids(mpt, p), GenerationParams(temperature=1.0, max_tokens=20))
                      for p in PROMPTS[1:3]]
        _wait_for_tokens(engine, alone.completion_tokens + 3)
        joined = engine.submit(ids, seeded)
        assert joined.result(timeout=60) == alone
        assert all(n.result(timeout=60).completion_tokens > 0 for n in neighbours)
        # An unseeded neighbour draws from torch's RNG; the seeded one did not move it.
        different = engine.submit(ids, seeded.model_copy(update={"seed": 8})).result(timeout=60)
        assert different.text != alone.text
    finally:
        engine.close()


@pytest.mark.parametrize("extreme", [{"top_p": 1e-300}, {"repetition_penalty": 1e-40},
                                     {"repetition_penalty": 1e-40, "top_p": 1e-300}])
def test_extreme_sampling_values_in_range_generate_and_fail_nobody(mpt, extreme):
    # Both once overflowed float32 (no token left to draw, or inf logits): the step failed, and
    # with it every request that shared it.
    params = GenerationParams(temperature=0.7, max_tokens=6, seed=3, **extreme)
    plain = GenerationParams(max_tokens=6)
    ids = [_ids(mpt, p) for p in PROMPTS[:3]]
    engine = _engine(mpt)
    try:
        futures = [engine.submit(ids[0], params), *(engine.submit(i, plain) for i in ids[1:])]
        results = [f.result(timeout=60) for f in futures]
        assert results[0].completion_tokens > 0
        assert results[1:] == [_alone(mpt, i, plain) for i in ids[1:]]
        assert engine.stats().sequences_failed == 0
    finally:
        engine.close()


def test_a_top_p_below_float32s_smallest_number_keeps_the_likeliest_token():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    params = GenerationParams(temperature=1.0, top_p=1e-300, seed=0)
    tokens, failed = sampling.next_tokens(logits, [params], [[]], [sampling.generator(params, torch.device("cpu"))])
    assert (tokens, failed) == ([1], {})


def test_a_row_whose_sampling_raises_fails_alone_and_its_neighbours_draw_as_without_it(mpt, monkeypatch):
    seeded = GenerationParams(temperature=0.9, seed=7, max_tokens=8)
    doomed = GenerationParams(temperature=0.9, seed=13, max_tokens=8)
    original = sampling._sample

    def sample(scores, p, gen):
        if p.seed == 13:
            raise RuntimeError("injected: sampling failed")
        return original(scores, p, gen)

    monkeypatch.setattr(sampling, "_sample", sample)
    ids = _ids(mpt, PROMPTS[0])
    engine = _engine(mpt, prefill_chunk=64)
    try:
        alone = engine.submit(ids, seeded).result(timeout=60)
        # One prompt, submitted together: the two finish their prefill in one step and sample there.
        futures = [engine.submit(ids, doomed), engine.submit(ids, seeded)]
        with pytest.raises(SequenceFailedError, match="injected: sampling failed"):
            futures[0].result(timeout=60)
        assert futures[1].result(timeout=60) == alone
        assert engine.stats().sequences_failed == 1
    finally:
        engine.close()


def test_cancelling_frees_the_slot_and_leaves_the_others_alone(mpt):
    params = GenerationParams(max_tokens=60)
    ids = [_ids(mpt, p) for p in PROMPTS[:3]]
    alone = [_alone(mpt, i, params) for i in ids]  # before the engine owns the model
    engine = _engine(mpt, max_num_seqs=2, max_cache_tokens=2 * 96)
    try:
        first, second, third = (engine.submit(i, params) for i in ids)  # third waits for a slot
        _wait_for_tokens(engine, 4)
        second.cancel()
        cancelled = second.result(timeout=60)
        assert cancelled.finish_reason == CANCELLED and cancelled.completion_tokens < 60
        assert first.result(timeout=60) == alone[0]
        assert third.result(timeout=60) == alone[2]
        stats = engine.stats()
        assert (stats.running, stats.waiting, stats.cache_tokens_used) == (0, 0, 0)
    finally:
        engine.close()


def test_closing_a_stream_cancels_its_sequence(mpt):
    engine = _engine(mpt)
    try:
        ids, params = _ids(mpt, PROMPTS[0]), GenerationParams(max_tokens=80)
        handle = engine.submit(ids, params)
        stream = handle.stream()
        next(stream)
        stream.close()
        assert handle.result(timeout=60).finish_reason == CANCELLED
        assert engine.stats().running == 0
    finally:
        engine.close()


@pytest.mark.parametrize("stop", [[], ["ay"], [" b", "ne"]])
def test_stream_joins_to_the_completion_and_holds_back_stop_strings(mpt, stop):
    engine = _engine(mpt)
    try:
        for text in PROMPTS[:3]:
            params = GenerationParams(max_tokens=20, stop=stop)
            handle = engine.submit(_ids(mpt, text), params)
            # At a stop string the text can end a step before the engine ends the sequence.
            assert "".join(handle.stream()) == handle.result(timeout=60).text
            assert handle.completion == _alone(mpt, _ids(mpt, text), params)
    finally:
        engine.close()


class _FailingOnce:
    """An adapter whose forward raises once, at its ``at``-th call: before running, or after
    (``after_writing``: the pass has written its keys into the cache)."""

    def __init__(self, adapter, at: int, after_writing: bool = False) -> None:
        self._adapter, self._at, self._after, self.calls = adapter, at, after_writing, 0

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def forward(self, batch, cache):
        self.calls += 1
        if self.calls == self._at and not self._after:
            raise RuntimeError("injected: CUDA out of memory")
        logits = self._adapter.forward(batch, cache)
        if self.calls == self._at:
            raise RuntimeError("injected: failed after writing keys")
        return logits


def test_prompts_are_read_oldest_first_whatever_slots_they_hold(mpt):
    # X leaves after two tokens and the newest running sequence (B) moves into its slot, ahead
    # of A's: A, older, must still be read first. A 4-token budget per step: X's token and
    # A's first 3, then A's 36 others, 4 a step, before B's first.
    engine = _engine(mpt, max_num_seqs=3, prefill_chunk=4, prefill_order="arrival")
    try:
        with engine._scheduler.condition:  # all four queued before the engine admits any
            x = engine.submit(_ids(mpt, "hi")[:1], GenerationParams(max_tokens=2))
            a = engine.submit(_ids(mpt, " ".join(["river"] * 40))[:39], GenerationParams(max_tokens=2))
            b, c = (engine.submit(_ids(mpt, "the sea")[:3], GenerationParams(max_tokens=2)) for _ in range(2))
        for sequence in (x, a, b, c):
            sequence.result(timeout=120)
        first_tokens = [sequence.timings[1] for sequence in (a, b, c)]
        assert first_tokens == sorted(first_tokens)
    finally:
        engine.close()


@pytest.mark.parametrize("slots", [3, 2], ids=["a-slot-each", "more-than-the-slots"])
def test_prompts_arriving_together_are_read_shortest_first(mpt, slots):
    # Submitted longest first, all before the engine admits any; a 4-token budget per step.
    # With two slots the shortest prompts must also be the first to get one.
    engine = _engine(mpt, max_num_seqs=slots, prefill_chunk=4)
    try:
        with engine._scheduler.condition:
            sequences = [engine.submit(_ids(mpt, " ".join(["river"] * 40))[:n], GenerationParams(max_tokens=2))
                         for n in (30, 12, 3)]
        for sequence in sequences:
            sequence.result(timeout=120)
        first_tokens = [sequence.timings[1] for sequence in sequences]
        assert first_tokens == sorted(first_tokens, reverse=True)
        assert engine._scheduler.seconds_per_prompt_token != 1e-3  # measured on the passes
    finally:
        engine.close()


@pytest.fixture
def scheduler(mpt):
    """An idle engine's scheduler, to rank sequences and measure passes by hand."""
    engine = _engine(mpt, max_num_seqs=3)
    yield engine._scheduler
    engine.close()


def test_an_older_prompt_goes_first_once_its_head_start_outweighs_its_length(scheduler):
    scheduler.seconds_per_prompt_token = 0.01
    long_, short = SequenceState([1] * 40, GenerationParams(), None), SequenceState([1] * 4, GenerationParams(), None)
    short.submitted = long_.submitted + 0.3  # 0.36 s less to read: the short one still goes first
    assert sorted([long_, short], key=scheduler._prefill_rank) == [short, long_]
    short.submitted = long_.submitted + 0.4
    assert sorted([long_, short], key=scheduler._prefill_rank) == [long_, short]
    long_.cached = 38  # two tokens left of its 40: ahead of a 4-token one arriving with it
    short.submitted = long_.submitted
    assert sorted([short, long_], key=scheduler._prefill_rank) == [long_, short]


def test_the_prefill_speed_weighs_passes_by_tokens_and_caps_one_off_costs(scheduler):
    first = scheduler.seconds_per_prompt_token
    scheduler._measured_prefill(5.0, 3)  # a first pass compiling kernels: counts 4x expected
    assert scheduler.seconds_per_prompt_token <= first * (256 * 0.8 + 4 * 3) / (256 * 0.8 + 3)
    for _ in range(20):  # steady passes of 500 tokens at 10 us each, with a slow 1-token tail
        scheduler._measured_prefill(500 * 1e-5, 500)
        scheduler._measured_prefill(4 * scheduler.seconds_per_prompt_token, 1)
    assert 1e-5 <= scheduler.seconds_per_prompt_token < 1.1e-5


def test_an_unknown_prefill_order_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"prefill_order must be one of shortest, arrival; received 'random'"):
        EngineConfig(prefill_order="random")


def test_padding_positions_stay_within_the_row_for_position_dependent_rotary_scaling(tiny_model):
    # Dynamic NTK rescales a whole pass's rotary frequencies from its largest position: padding
    # queries past a row's last token (240 + 20 here, over the 256 positions) rescaled the
    # pass of the row beside them.
    path = tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="sdpa", max_position_embeddings=256,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}).eval()
    loaded = (model, prepare_tokenizer(AutoTokenizer.from_pretrained(path)), HuggingFaceAdapter(model))
    generator = torch.Generator().manual_seed(0)
    long, short = (torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in (240, 60))
    params = GenerationParams(max_tokens=16)
    expected = [_alone(loaded, ids, params) for ids in (long, short)]
    engine = _engine(loaded, max_num_seqs=2, max_cache_tokens=512, prefill_chunk=100)
    try:
        # The long prompt's last 40 tokens share a pass with the short one's 60.
        handles = [engine.submit(ids, params) for ids in (long, short)]
        assert [h.result(timeout=120) for h in handles] == expected
    finally:
        engine.close()


def test_longrope_models_generate_whole_batches(tiny_model):
    # LongRoPE picks its factors per pass from the largest position: not per sequence.
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), max_position_embeddings=512, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 128, "factor": 4.0,
        "short_factor": [1.0] * 8, "long_factor": [1.0, 1.5, 2, 3, 4, 6, 8, 12]})
    assert not HuggingFaceAdapter.supports(model, "sdpa")


def test_a_failing_step_fails_only_its_sequences(mpt):
    model, tokenizer, adapter = mpt
    params = GenerationParams(max_tokens=10)
    ids = [_ids(mpt, p) for p in PROMPTS[:2]]
    # Call 1 prefills the first prompt alone (chunk 64 > its length); call 2 fails: the
    # first's first decode step, with the second still waiting for the only slot (in arrival
    # order: read shortest first, the second could take the slot if both were waiting).
    engine = Engine(model, tokenizer, _FailingOnce(adapter, at=2),
                    EngineConfig(max_num_seqs=1, max_cache_tokens=96, prefill_chunk=64, prefill_order="arrival"))
    try:
        first, second = (engine.submit(i, params) for i in ids)
        with pytest.raises(SequenceFailedError, match="injected: CUDA out of memory"):
            first.result(timeout=60)
        assert second.result(timeout=60) == _alone(mpt, ids[1], params)
        assert engine.submit(ids[0], params).result(timeout=60) == _alone(mpt, ids[0], params)
        assert engine.stats().sequences_failed == 1
    finally:
        engine.close()


def test_a_pass_failing_after_writing_keys_leaves_every_slot_it_wrote_zeroed(mpt):
    model, tokenizer, adapter = mpt
    params = GenerationParams(max_tokens=10)
    first = _ids(mpt, PROMPTS[0])
    ids = [first, [*first[:-1], first[-1] + 1]]  # as long: one prefill pass reads both
    # Call 1 prefills both prompts in one pass; call 2, their first decode step, writes a key
    # in both slots and fails. The first to leave moves the other into its slot: what that
    # pass wrote past the mover's tokens must not stay behind in the slot it vacates.
    failing = _FailingOnce(adapter, at=2, after_writing=True)
    engine = Engine(model, tokenizer, failing, EngineConfig(max_num_seqs=2, max_cache_tokens=2 * 96,
                                                            prefill_chunk=64))
    try:
        with engine._scheduler.condition:  # both admitted at the same step
            handles = [engine.submit(i, params) for i in ids]
        for handle in handles:
            with pytest.raises(SequenceFailedError, match="injected: failed after writing keys"):
                handle.result(timeout=60)
        assert failing.calls == 2 and engine.stats().running == 0
        cache = engine._scheduler.cache
        assert not cache.k.any() and not cache.v.any()
        assert [engine.submit(i, params).result(timeout=60) for i in ids] == [_alone(mpt, i, params) for i in ids]
    finally:
        engine.close()


def test_cancelled_sequences_still_queued_do_not_count_against_max_waiting(mpt):
    ids, params = _ids(mpt, PROMPTS[0]), GenerationParams(max_tokens=3)
    engine = _engine(mpt, max_num_seqs=1, max_cache_tokens=96, max_waiting=2)
    try:
        with engine._scheduler.condition:  # the scheduler admits nothing meanwhile
            first, *cancelled = (engine.submit(ids, params) for _ in range(3))  # one takes the slot
            with pytest.raises(EngineFullError, match="0 sequences running and 3 waiting"):
                engine.submit(ids, params)
            for sequence in cancelled:
                sequence.cancel()  # dropped by the next step; until then they hold no place
            assert engine.stats().waiting == 1  # the first, which the free slot will take
            last = engine.submit(ids, params)
        assert last.result(timeout=60) == first.result(timeout=60) == _alone(mpt, ids, params)
    finally:
        engine.close()


def test_stats_wait_for_a_sequence_moving_between_slots(mpt, monkeypatch):
    # Leaving moves other sequences between slots; read half-way, one would count twice.
    engine = _engine(mpt, max_num_seqs=3, prefill_chunk=4)
    readers: list[tuple[threading.Thread, list, bool]] = []
    move = SlotCache.move

    def move_then_read(cache, source, target, length):
        move(cache, source, target, length)
        seen: list = []
        reader = threading.Thread(target=lambda: seen.append(engine.stats()))
        reader.start()
        reader.join(0.05)
        readers.append((reader, seen, not reader.is_alive()))  # read during the move?

    monkeypatch.setattr(SlotCache, "move", move_then_read)
    try:
        # A ends first while B decodes and C still reads its long prompt: A's slot is filled.
        with engine._scheduler.condition:
            handles = [engine.submit(_ids(mpt, "a b"), GenerationParams(max_tokens=2)),
                       engine.submit(_ids(mpt, "c d"), GenerationParams(max_tokens=30)),
                       engine.submit(list(range(10, 50)), GenerationParams(max_tokens=3))]
        for handle in handles:
            handle.result(timeout=60)
    finally:
        engine.close()
    assert readers
    for reader, seen, during_the_move in readers:
        reader.join(5)
        assert not during_the_move  # it waited for the sequences to be whole
        assert len(seen) == 1 and seen[0].running <= 3


def test_32_threads_get_what_serial_calls_get(mpt):
    requests = [(_ids(mpt, PROMPTS[i % len(PROMPTS)] + " x" * (i % 7)),
                 GenerationParams(max_tokens=1 + i % 9, stop=["e"] if i % 3 == 0 else [],
                                  repetition_penalty=1.3 if i % 4 == 0 else 1.0))
                for i in range(32)]
    engine = _engine(mpt, max_num_seqs=6, max_cache_tokens=6 * 96)
    try:
        serial = [engine.submit(*r).result(timeout=60) for r in requests]
        with ThreadPoolExecutor(32) as pool:
            concurrent = list(pool.map(lambda r: engine.submit(*r).result(timeout=120), requests))
        assert concurrent == serial
        assert serial[0] == _alone(mpt, *requests[0])  # repetition penalty as transformers has it
    finally:
        engine.close()


class _Blocking:
    """An adapter that waits in forward until released, to hold the engine busy."""

    def __init__(self, adapter) -> None:
        self._adapter = adapter
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def forward(self, batch, cache):
        self.entered.set()
        self.release.wait(60)
        return self._adapter.forward(batch, cache)


def test_a_full_queue_refuses_with_the_limit_and_long_sequences_are_refused(mpt):
    model, tokenizer, adapter = mpt
    blocking = _Blocking(adapter)
    engine = Engine(model, tokenizer, blocking, EngineConfig(max_num_seqs=1, max_cache_tokens=64,
                                                             max_waiting=1))
    try:
        params = GenerationParams(max_tokens=4)
        running = engine.submit([1, 2, 3], params)
        assert blocking.entered.wait(60)
        waiting = engine.submit([1, 2, 3], params)
        with pytest.raises(EngineFullError, match=r"max_waiting=1"):
            engine.submit([1, 2, 3], params)
        with pytest.raises(ValueError, match="over the 64 tokens one sequence may hold"):
            engine.submit(list(range(60)), GenerationParams(max_tokens=5))
        blocking.release.set()
        assert running.result(timeout=60).completion_tokens == 4
        assert waiting.result(timeout=60).completion_tokens == 4
    finally:
        blocking.release.set()
        engine.close()


def test_memory_is_bounded_by_the_token_budget_not_by_rows(mpt):
    engine = _engine(mpt, max_num_seqs=2, max_cache_tokens=2 * 40, max_waiting=100)
    try:
        assert engine.max_num_seqs == 2 and engine.max_seq_len == 40
        handles = [engine.submit([5 + i % 7] * 3, GenerationParams(max_tokens=2)) for i in range(60)]
        assert all(h.result(timeout=120).completion_tokens >= 1 for h in handles)
        assert engine.stats().sequences_finished == 60
    finally:
        engine.close()


def test_dropping_the_engine_stops_its_thread(mpt):
    engine = _engine(mpt)
    handle = engine.submit(_ids(mpt, PROMPTS[0]), GenerationParams(max_tokens=3))
    handle.result(timeout=60)
    thread = engine._thread
    del engine
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


def test_no_hang_at_interpreter_exit(tiny_snapshot):
    script = textwrap.dedent(f"""
        from transformers import AutoTokenizer, MptForCausalLM
        from templated_llm.engine import Engine
        from templated_llm.runtime.tokens import prepare_tokenizer
        from templated_llm.runtime.params import GenerationParams
        from templated_llm_mpt.engine import MptAdapter
        model = MptForCausalLM.from_pretrained({str(tiny_snapshot)!r}).eval()
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained({str(tiny_snapshot)!r}))
        engine = Engine(model, tokenizer, MptAdapter(model, "eager"))
        handle = engine.submit([1, 2, 3], GenerationParams(max_tokens=1000))
        next(handle.stream())
        print("exiting with a sequence running", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "exiting with a sequence running" in done.stdout


def test_stats_count_tokens_and_latencies(mpt):
    engine = _engine(mpt)
    try:
        handles = [engine.submit(_ids(mpt, p), GenerationParams(max_tokens=5)) for p in PROMPTS]
        tokens = sum(h.result(timeout=60).completion_tokens for h in handles)
        stats = engine.stats()
        assert stats.tokens_generated == tokens and stats.sequences_finished == len(PROMPTS)
        assert stats.time_to_first_token.count == len(PROMPTS)
        assert 0 < stats.time_to_first_token.p50 <= stats.time_to_first_token.p99
        assert stats.cache_tokens_capacity == 3 * 96
    finally:
        engine.close()


def test_torch_rng_of_the_caller_is_untouched_by_seeded_sequences(mpt):
    engine = _engine(mpt)
    try:
        torch.manual_seed(0)
        expected = torch.rand(1)
        torch.manual_seed(0)
        engine.submit(_ids(mpt, "hi"), GenerationParams(temperature=1.0, seed=3, max_tokens=4)).result(60)
        assert torch.equal(torch.rand(1), expected)
    finally:
        engine.close()


class _Overflowing:
    """An adapter whose passes over ``slot`` overflow: NaN keys and values into its cache and
    NaN logits, as a float16 overflow gives."""

    def __init__(self, adapter, slot: int, after=lambda: None) -> None:
        self._adapter, self.slot, self.on, self._after = adapter, slot, True, after

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def forward(self, batch, cache):
        logits = self._adapter.forward(batch, cache)
        if self.on and self.slot in batch.slots:
            row = batch.slots.index(self.slot)
            end = batch.starts[row] + batch.lengths[row]
            cache.k[:, self.slot, :, :end] = float("nan")
            cache.v[:, self.slot, :, :end] = float("nan")
            logits[row] = float("nan")
            self._after()
        return logits


def test_an_overflowing_sequence_fails_alone_and_leaves_its_slot_clean(tiny_snapshot):
    # Eager attention reads every row's slot up to the longest row, masked keys included.
    mpt = _load(tiny_snapshot, "mpt", "eager")
    model, tokenizer, adapter = mpt
    overflowing = _Overflowing(adapter, slot=1)
    # Slots in arrival order, whatever the prompts' lengths: the test places each sequence.
    engine = Engine(model, tokenizer, overflowing, EngineConfig(max_num_seqs=2, max_cache_tokens=2 * 96,
                                                                prefill_chunk=64, prefill_order="arrival"))
    long, short = _ids(mpt, PROMPTS[2]), _ids(mpt, PROMPTS[1])
    greedy, sampled = GenerationParams(max_tokens=6), GenerationParams(max_tokens=6, temperature=1.0, seed=3)
    try:
        first = engine.submit(short, sampled)  # slot 0: sampling, so NaN beside it would fail its step
        broken = engine.submit(long, greedy)  # slot 1: overflows
        with pytest.raises(SequenceFailedError, match=r"non-finite logits .* the model's weights"):
            broken.result(timeout=60)
        assert first.result(timeout=60) == engine.submit(short, sampled).result(timeout=60)
        cache = engine._scheduler.cache  # noqa: SLF001 - no NaN may outlive its sequence there
        assert not (cache.k.isnan().any() or cache.v.isnan().any())
        overflowing.on = False
        # A shorter sequence in the overflowed slot beside a longer one: the keys it does not
        # see there hold zeros, not the NaN of the sequence before.
        again, beside = engine.submit(long, greedy), engine.submit(short, greedy)
        assert beside.result(timeout=60) == _alone(mpt, short, greedy)
        assert again.result(timeout=60) == _alone(mpt, long, greedy)
        assert engine.stats().sequences_failed == 1
    finally:
        engine.close()


def test_a_sequence_cancelled_while_reading_its_prompt_leaves_no_overflow_behind(tiny_snapshot):
    # Its logits are never sampled (the prompt is read in chunks), so only leaving can clear it.
    mpt = _load(tiny_snapshot, "mpt", "eager")
    model, tokenizer, adapter = mpt
    handle = []
    overflowing = _Overflowing(adapter, slot=0, after=lambda: handle[0].cancel())
    engine = Engine(model, tokenizer, overflowing,
                    EngineConfig(max_num_seqs=2, max_cache_tokens=2 * 96, prefill_chunk=4))
    try:
        handle.append(engine.submit(_ids(mpt, PROMPTS[2]), GenerationParams(max_tokens=6)))
        assert handle[0].result(timeout=60).finish_reason == CANCELLED
        cache = engine._scheduler.cache  # noqa: SLF001
        assert not (cache.k.isnan().any() or cache.v.isnan().any())
    finally:
        engine.close()
