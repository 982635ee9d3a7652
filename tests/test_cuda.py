"""On a real CUDA GPU: what ``auto`` picks there, the memory check against the GPU's own free
memory, and generation on the engine and in whole batches. Skipped without a GPU (the CPU-side
logic of each is tested with simulated devices in test_dtype.py and test_memory.py)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import MptForCausalLM

from templated_llm import log_llm
from templated_llm.devtools.tiny import build_tiny_mpt
from templated_llm.engine import EngineConfig
from templated_llm.errors import InsufficientMemoryError
from templated_llm.runtime.memory import MEMORY_LIMIT_ENV, cache_bytes_per_token

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["Name three rivers.", "Say hi", "Count to five, slowly, and then say which number came third."]


@pytest.fixture(scope="module")
def bf16_snapshot(tmp_path_factory) -> Path:
    return build_tiny_mpt(tmp_path_factory.mktemp("cuda") / "tiny-mpt-bf16", dtype="bfloat16")


def _greedy(model) -> list[str]:
    frame = model.predict({"prompt": PROMPTS}, params={"max_tokens": 12, "temperature": 0.0, "return_usage": True})
    for tokens, reason in zip(frame["completion_tokens"], frame["finish_reason"]):
        assert (reason, tokens) == ("length", 12) or (reason == "stop" and 0 < tokens < 12)
    return list(frame["candidates"])


def test_auto_loads_a_bf16_checkpoint_in_bf16_on_the_gpu_unpacked(bf16_snapshot, caplog):
    uri = log_llm("mpt-instruct", snapshot=bf16_snapshot).model_uri
    with caplog.at_level(logging.INFO):
        model = mlflow.pyfunc.load_model(uri)
    loaded = model.unwrap_python_model().model
    assert loaded.device.type == "cuda" and loaded.dtype == torch.bfloat16
    assert "dtype bfloat16 on cuda" in caplog.text
    # Packing is a CPU layout: every linear layer on the GPU stays a plain nn.Linear.
    linears = [m for m in loaded.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and {type(m) for m in linears} == {torch.nn.Linear}
    assert all(p.device.type == "cuda" for p in loaded.parameters())


def test_the_engine_and_whole_batches_generate_the_same_greedy_text_on_the_gpu(tiny_snapshot):
    uri = log_llm("mpt-instruct", snapshot=tiny_snapshot).model_uri  # float32: no bf16 near ties
    engine = mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})
    whole = mlflow.pyfunc.load_model(uri, model_config={"device": "cuda", "engine": False})
    assert engine.unwrap_python_model().model.device.type == "cuda"
    assert _greedy(engine) == _greedy(whole)


def test_a_cache_budget_over_the_gpus_free_memory_is_refused_before_any_weight_is_read(
        bf16_snapshot, monkeypatch):
    free, _ = torch.cuda.mem_get_info()
    tokens = 2 * free // cache_bytes_per_token(bf16_snapshot, torch.bfloat16)
    uri = log_llm("mpt-instruct", snapshot=bf16_snapshot, engine=EngineConfig(max_cache_tokens=tokens)).model_uri

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(MptForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(InsufficientMemoryError) as refused:
        mlflow.pyfunc.load_model(uri)
    message = str(refused.value)
    assert "model 'mpt-instruct' in bfloat16 on cuda needs about" in message
    assert f"is available (free memory of {torch.cuda.get_device_name()})" in message
    assert re.search(rf"a max_cache_tokens of at most \d+ \({tokens} now", message), message


def test_an_unbudgeted_engine_cache_on_the_gpu_takes_its_share_of_gpu_memory_not_the_hosts(
        tiny_snapshot, monkeypatch):
    # A host limit below what the process already uses: had the engine sized its GPU cache from
    # the host's figure, it would get one slot.
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1MB")
    uri = log_llm("mpt-instruct", snapshot=tiny_snapshot).model_uri
    model = mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})
    engine = model.unwrap_python_model().engine
    free, _ = torch.cuda.mem_get_info()
    cache = engine._scheduler.cache
    assert cache.k.device.type == "cuda"
    assert engine.max_num_seqs > 1
    assert 2 * cache.k.numel() * cache.k.element_size() <= free
