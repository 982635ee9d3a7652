"""dtype='auto' and explicit dtypes: what is chosen where, refusals, and bf16 results."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import MptForCausalLM

from templated_llm import log_llm
from templated_llm.devtools.tiny import build_tiny_mpt
from templated_llm.errors import ConfigError, DTypeUnavailableError, EmulatedDTypeWarning
from templated_llm.runtime.device import choose_dtype, load_device

# Greedy decoding of 4 prompts, as the parity tests run it.
PROMPTS = ["What is machine learning?", "Name three rivers.", "Explain attention", "Write a list"]


@pytest.fixture(scope="module")
def bf16_snapshot(tmp_path_factory) -> Path:
    return build_tiny_mpt(tmp_path_factory.mktemp("bf16") / "tiny-mpt-bf16", dtype="bfloat16")


def _cpu(monkeypatch, *flags: str) -> None:
    """Simulate a CPU with exactly ``flags`` (torch's capability check, seen by every copy of
    templated_llm, including the one a loaded model carries)."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {f: True for f in flags})


def _config_only(tmp_path: Path, dtype: str | None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mpt", "dtype": dtype}))
    return tmp_path


@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16", "bf16"])
def test_auto_picks_bfloat16_for_a_bfloat16_checkpoint_on_a_cpu_that_computes_it(monkeypatch, tmp_path, flag):
    _cpu(monkeypatch, flag, "avx512_f")
    choice = choose_dtype("auto", "cpu", _config_only(tmp_path, "bfloat16"))
    assert choice.name == "bfloat16"
    assert flag in choice.reason


def test_auto_picks_float32_where_bfloat16_would_be_emulated(monkeypatch, tmp_path):
    _cpu(monkeypatch, "avx512_f", "avx2")
    choice = choose_dtype("auto", "cpu", _config_only(tmp_path, "bfloat16"))
    assert choice.name == "float32"
    assert "no bfloat16 instructions" in choice.reason and "emulated" in choice.reason


@pytest.mark.parametrize("stored", ["float32", "float16", None])
def test_auto_keeps_float32_on_cpu_for_other_checkpoints(monkeypatch, tmp_path, stored):
    _cpu(monkeypatch, "amx_bf16", "avx512_bf16", "avx512_fp16")
    assert choose_dtype("auto", "cpu", _config_only(tmp_path, stored)).name == "float32"


def test_auto_on_cuda_prefers_bfloat16_and_falls_back_to_float16(monkeypatch, tmp_path):
    snapshot = _config_only(tmp_path, "bfloat16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_dtype("auto", "cuda", snapshot).name == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    choice = choose_dtype("auto", "cuda", snapshot)
    assert choice.name == "float16" and "no bfloat16" in choice.reason


def test_an_explicit_dtype_wins_and_an_emulated_one_warns(monkeypatch, tmp_path):
    snapshot = _config_only(tmp_path, "bfloat16")
    _cpu(monkeypatch, "amx_bf16")
    assert choose_dtype("float32", "cpu", snapshot).name == "float32"
    _cpu(monkeypatch, "avx2")
    with pytest.warns(EmulatedDTypeWarning, match="emulated.*slower than float32"):
        assert choose_dtype("bfloat16", "cpu", snapshot).name == "bfloat16"


def _gpu_without_bf16(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")


def test_a_dtype_the_device_cannot_run_is_refused_at_log_time(tiny_snapshot, monkeypatch):
    _gpu_without_bf16(monkeypatch)
    with pytest.raises(DTypeUnavailableError, match="Tesla V100 has none.*float16"):
        log_llm("mpt-instruct", snapshot=tiny_snapshot, dtype="bfloat16")
    with pytest.raises(DTypeUnavailableError, match="unknown dtype 'fp8'"):
        log_llm("mpt-instruct", snapshot=tiny_snapshot, dtype="fp8")


def test_a_dtype_the_device_cannot_run_is_refused_at_load_time(tiny_snapshot, monkeypatch):
    uri = log_llm("mpt-instruct", snapshot=tiny_snapshot, dtype="bfloat16").model_uri  # fine here
    _gpu_without_bf16(monkeypatch)

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(MptForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(DTypeUnavailableError, match="bfloat16 support"):
        mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})


def test_the_choice_and_its_reason_are_logged_at_load(bf16_snapshot, monkeypatch, caplog):
    _cpu(monkeypatch, "amx_bf16")
    uri = log_llm("mpt-instruct", snapshot=bf16_snapshot).model_uri
    with caplog.at_level(logging.INFO):
        model = mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"}).unwrap_python_model().model
    assert model.dtype == torch.bfloat16
    assert "dtype bfloat16 on cpu: the checkpoint is bfloat16 and this CPU computes it natively (amx_bf16)" in caplog.text
    _cpu(monkeypatch, "avx2")
    with caplog.at_level(logging.INFO):
        model = mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"}).unwrap_python_model().model
    assert model.dtype == torch.float32
    assert "dtype float32 on cpu: the checkpoint is bfloat16, but this CPU has no bfloat16" in caplog.text


def test_an_explicit_dtype_other_than_the_checkpoints_converts_it_at_load(tiny_snapshot):
    info = log_llm("mpt-instruct", snapshot=tiny_snapshot, dtype="bfloat16")
    model = mlflow.pyfunc.load_model(info.model_uri).unwrap_python_model().model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert model.config.dtype == torch.bfloat16


def _loaded(snapshot: Path, **options):
    # On the CPU, also on a machine with a GPU (where the default device is CUDA).
    return mlflow.pyfunc.load_model(log_llm("mpt-instruct", snapshot=snapshot, **options).model_uri,
                                    model_config={"device": "cpu"})


def test_bfloat16_greedy_output_equals_plain_transformers_in_bfloat16(bf16_snapshot):
    # Whole batches through generate with eager attention: the packed bf16 matmuls give plain
    # transformers' bf16 logits exactly here, so greedy picks cannot flip.
    pyfunc = _loaded(bf16_snapshot, dtype="bfloat16", attention="eager", engine=False)
    ours = pyfunc.unwrap_python_model()
    got = pyfunc.predict(PROMPTS, params={"temperature": 0.0, "max_tokens": 12})["candidates"].tolist()
    plain = MptForCausalLM.from_pretrained(bf16_snapshot, dtype=torch.bfloat16).eval()
    batch = ours.tokenizer(ours.render(PROMPTS), return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = plain.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=True,
                             pad_token_id=ours.tokenizer.pad_token_id)
    assert got == ours.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_bfloat16_logits_stray_from_float32_no_more_than_plain_transformers_bfloat16(bf16_snapshot):
    """The tolerance, for the default attention (sdpa), whose summation order differs: bf16 keeps
    8 bits of mantissa, so every matmul rounds at about 0.4%; TemplatedLLM's logits may stray from
    a float32 reference by at most twice what plain transformers' own bf16 logits stray, plus
    1e-3 of the logits' scale. Greedy picks can then differ where two logits are that close."""
    ours = _loaded(bf16_snapshot, dtype="bfloat16").unwrap_python_model()
    assert ours.attention == "sdpa"
    plain = MptForCausalLM.from_pretrained(bf16_snapshot, dtype=torch.bfloat16).eval()
    reference = MptForCausalLM.from_pretrained(bf16_snapshot, dtype=torch.float32).eval()
    ids = torch.randint(1, 1000, (4, 23), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = reference(ids).logits
        plain_error = (plain(ids).logits.float() - want).abs().max()
        our_error = (ours.model(ids).logits.float() - want).abs().max()
    assert our_error <= 2 * plain_error + 1e-3 * want.abs().max()


@pytest.mark.parametrize(("requested", "loads_on"), [(None, "cpu"), ("cpu", "cpu"), ("cpu:0", "cpu")])
def test_a_cpu_device_is_named_cpu_whatever_the_spelling(requested, loads_on, monkeypatch):
    # "cpu:0" skipped the CPU paths (weight packing, conversion), which compare with "cpu".
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_device(requested) == loads_on


@pytest.mark.parametrize(("requested", "says"), [
    ("cuda", "device 'cuda' needs a CUDA GPU; this process sees none"),
    ("cuda:3", "device 'cuda:3' needs a CUDA GPU; this process sees none"),
    ("meta", "device 'meta' cannot run a model here"),
    ("gpu", "device 'gpu' is not a device torch knows"),
])
def test_a_device_this_process_cannot_run_on_is_a_config_error(requested, says, monkeypatch):
    # cuda on a CPU-only machine was torch's bare AssertionError; meta loaded, then failed every request.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=f"^model_config: {re.escape(says)}"):
        load_device(requested)


def test_a_gpu_index_past_the_gpus_present_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert load_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match="device 'cuda:2' needs a CUDA GPU; this process sees 2"):
        load_device("cuda:2")
