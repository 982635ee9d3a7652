"""Attention backends for MPT against transformers' eager MPT, and the backend checks."""

from __future__ import annotations

import shutil

import mlflow
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import MptForCausalLM, StaticCache

from templated_llm import AttentionUnavailableError
from templated_llm.model_logging.log import log_llm
from templated_llm.plugins.attention import unavailable as attention_unavailable
from templated_llm.plugins.manager import get_model_spec
from templated_llm.runtime.loading import select_attention
from templated_llm_mpt import kernels
from templated_llm_mpt.attention import install_attention

TOLERANCE = 1e-4  # float32 logits


def _model(snapshot, backend: str) -> MptForCausalLM:
    model = MptForCausalLM.from_pretrained(snapshot).eval()
    if backend != "eager":
        install_attention(model, backend)
    return model


@pytest.fixture(scope="module")
def eager(tiny_snapshot):
    return _model(tiny_snapshot, "eager")


@pytest.fixture(scope="module")
def sdpa(tiny_snapshot):
    return _model(tiny_snapshot, "sdpa")


def _batch(draw_lengths: list[int], vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Random prompts of the given lengths, left-padded to the longest."""
    longest = max(draw_lengths)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (len(draw_lengths), longest), generator=generator)
    mask = torch.zeros_like(input_ids)
    for row, length in enumerate(draw_lengths):
        mask[row, longest - length :] = 1
    return {"input_ids": input_ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _greedy(model, batch, new_tokens: int):
    with torch.inference_mode():
        return model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            use_cache=True, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
        )


def _assert_matches_eager(eager, fast, batch, new_tokens: int) -> None:
    expected, got = _greedy(eager, batch, new_tokens), _greedy(fast, batch, new_tokens)
    assert torch.equal(got.sequences, expected.sequences)
    # Step 0 is the prefill (with left padding); the others run on the KV cache.
    for step, (want, have) in enumerate(zip(expected.logits, got.logits, strict=True)):
        diff = (want - have).abs().max().item()
        assert diff < TOLERANCE, f"step {step}: logits differ by {diff}"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(1, 24), min_size=1, max_size=4),
    new_tokens=st.integers(1, 4),
    # Long prefills run in chunks of queries; small chunks exercise that on short prompts.
    chunk=st.none() | st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_sdpa_matches_eager(eager, sdpa, lengths, new_tokens, chunk, seed):
    default = kernels.PREFILL_CHUNK
    kernels.PREFILL_CHUNK = chunk or default
    try:
        _assert_matches_eager(eager, sdpa, _batch(lengths, eager.config.vocab_size, seed), new_tokens)
    finally:
        kernels.PREFILL_CHUNK = default


@pytest.mark.parametrize(
    ("lengths", "seed"),
    [([30, 7, 1], 1),
     ([3 * kernels.PREFILL_CHUNK + 5, kernels.PREFILL_CHUNK + 1, 1], 5)],
    ids=["short", "long, in query chunks"],
)
def test_sdpa_prefill_with_left_padding_matches_eager_without_a_cache(eager, sdpa, lengths, seed):
    batch = _batch(lengths, eager.config.vocab_size, seed)
    with torch.inference_mode():
        want = eager(**batch, use_cache=False).logits
        have = sdpa(**batch, use_cache=False).logits
    real = batch["attention_mask"].bool()
    assert (want - have)[real].abs().max().item() < TOLERANCE


def test_sdpa_builds_each_query_runs_mask_only_over_the_keys_it_sees(sdpa):
    alibi = sdpa.transformer.blocks[0].attn.alibi
    causal = torch.ones(10, 10, dtype=torch.bool).triu(1)[None, None]  # True = masked
    chunks = alibi.chunk_masks(causal, torch.float32, size=4)
    assert [(start, end, keys, tuple(mask.shape)) for start, end, keys, mask in chunks] == [
        (0, 4, 4, (1, sdpa.config.n_heads, 4, 4)), (4, 8, 8, (1, sdpa.config.n_heads, 4, 8)),
        (8, 10, 10, (1, sdpa.config.n_heads, 2, 10))]
    # Each mask is its own tensor, not a view of one over every query and key.
    assert all(mask.untyped_storage().nbytes() == mask.numel() * 4 for *_, mask in chunks)
    alibi.release()


@pytest.mark.parametrize(("seen", "keys"), [((7, 1500), 1500), ((10,), 2000)],
                         ids=["a short row beside a long one", "a static cache's unfilled end"])
def test_alibi_measures_each_key_from_its_query_exactly_in_bfloat16(sdpa, seen, keys):
    # A decode step: each row's query sees its first `seen` keys. Its nearest keys' bias is
    # -slope * distance, exact in bfloat16, whatever the longest row or the cache's length.
    alibi = sdpa.transformer.blocks[0].attn.alibi
    masked = torch.arange(keys)[None, None, None, :] >= torch.tensor(seen)[:, None, None, None]
    [(_, _, _, mask)] = alibi.chunk_masks(masked, torch.bfloat16, size=256)
    alibi.release()
    for row, n in enumerate(seen):
        distance = torch.arange(n) - (n - 1)
        want = (alibi.slopes[:, None] * distance).to(torch.bfloat16)  # (heads, n)
        assert torch.equal(mask[row, :, 0, :n], want)
        assert (mask[row, :, 0, n:] == torch.finfo(torch.bfloat16).min).all()


@pytest.mark.skipif(attention_unavailable("triton", "cpu") is not None, reason="no C++ compiler")
def test_triton_matches_eager_on_cpu(eager, tiny_snapshot):
    # flex_attention compiles once per shape, tens of seconds on CPU: one small example.
    triton = _model(tiny_snapshot, "triton")
    _assert_matches_eager(eager, triton, _batch([5, 3], eager.config.vocab_size, seed=2), 2)


@pytest.mark.skipif(
    attention_unavailable("flash", "cuda") is not None,
    reason=str(attention_unavailable("flash", "cuda")),  # no CUDA GPU, or no flash-attn
)
def test_flash_matches_eager_on_cuda(tiny_snapshot):
    # flash-attn runs in half precision: compare against eager in bfloat16, more loosely.
    eager = MptForCausalLM.from_pretrained(tiny_snapshot, dtype=torch.bfloat16).cuda().eval()
    flash = MptForCausalLM.from_pretrained(tiny_snapshot, dtype=torch.bfloat16).cuda().eval()
    install_attention(flash, "flash")
    batch = {k: v.cuda() for k, v in _batch([9, 4, 1], eager.config.vocab_size, seed=3).items()}
    expected, got = _greedy(eager, batch, 4), _greedy(flash, batch, 4)
    for want, have in zip(expected.logits, got.logits, strict=True):
        assert (want.float() - have.float()).abs().max().item() < 0.1


def test_decode_uses_a_preallocated_cache_and_alibi_built_once(sdpa):
    batch = _batch([6, 2], sdpa.config.vocab_size, seed=4)
    out = _greedy(sdpa, batch, 3)
    assert isinstance(out.past_key_values, StaticCache)  # written in place, never torch.cat
    transformer = sdpa.transformer
    assert transformer.build_mpt_alibi_tensor(4, 2048) is transformer.build_mpt_alibi_tensor(4, 2048)


def test_greedy_predictions_through_templated_llm_match_eager(tiny_snapshot):
    prompts = ["What is machine learning?", "Hi", "Name three rivers and three mountains."]
    outputs = {}
    for backend in ("eager", "sdpa"):
        info = log_llm("mpt-instruct", snapshot=tiny_snapshot, attention=backend, name=backend)
        loaded = mlflow.pyfunc.load_model(info.model_uri, model_config={"device": "cpu"})
        assert loaded.unwrap_python_model().attention == backend
        outputs[backend] = loaded.predict(prompts, params={"temperature": 0.0, "max_tokens": 12})
    assert outputs["sdpa"]["candidates"].tolist() == outputs["eager"]["candidates"].tolist()


def test_auto_picks_sdpa_on_cpu_and_says_so(caplog):
    spec = get_model_spec("mpt-instruct")
    with caplog.at_level("INFO"):
        chosen = select_attention(spec, "auto", "cpu", None)
    assert chosen == "sdpa"
    assert "attention 'auto' chose 'sdpa'" in caplog.text


def test_triton_on_cpu_without_a_compiler_fails_at_log_time_naming_what_is_missing(tiny_snapshot, monkeypatch):
    # flash without CUDA: test_attention_generic.py, for this plugin and the core's defaults.
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # log_llm checks the machine's device
    with pytest.raises(AttentionUnavailableError, match="C\\+\\+ compiler"):
        log_llm("mpt-instruct", snapshot=tiny_snapshot, attention="triton")


def test_flash_refuses_float32_weights(tiny_snapshot):
    with pytest.raises(AttentionUnavailableError, match="bfloat16"):
        _model(tiny_snapshot, "flash")


def test_a_plugin_adds_a_backend_to_the_table_and_names_are_checked_there(monkeypatch):
    from templated_llm.plugins import attention

    monkeypatch.setattr(attention, "_TABLE", dict(attention._TABLE))  # this test's additions only
    attention.register_attention(attention.AttentionBackend(
        "paged", needs="a CUDA GPU", auto_rank=10,
        unavailable=lambda device: None if device.startswith("cuda") else "'paged' needs a CUDA GPU",
    ))
    assert attention.backend_names() == ["auto", "eager", "sdpa", "triton", "flash", "paged"]
    with pytest.raises(ValueError, match="'paged' is already in the table"):
        attention.register_attention(attention.AttentionBackend("paged", needs="nothing"))
    # auto passes over what cannot run here, and over what the model does not support.
    assert attention.resolve("auto", "cpu") == "sdpa"
    with pytest.raises(AttentionUnavailableError, match="'paged' needs a CUDA GPU"):
        attention.resolve("paged", "cpu")
    with pytest.raises(AttentionUnavailableError, match="Toy does not implement attention backend 'sdpa'"):
        attention.resolve("sdpa", "cpu", ["eager"], owner="Toy")
    with pytest.raises(AttentionUnavailableError, match=r"unknown attention backend 'pagd'; choose one of \['auto'"):
        attention.resolve("pagd", "cpu")
