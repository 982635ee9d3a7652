"""Generic Hugging Face models: backends map to transformers' attn_implementation."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from templated_llm import AttentionUnavailableError, ModelSpec, hookimpl, register_plugin
from templated_llm.engine.adapters import ENGINE_SDPA
from templated_llm.model_logging.log import log_llm
from templated_llm.plugins.manager import get_model_spec
from templated_llm.runtime.loading import select_attention


class TinyLlamaPlugin:
    """Declares a model and nothing else: loading and attention come from the core's defaults."""

    @hookimpl
    def register_models(self, register):
        register(ModelSpec(name="tiny-llama", repo_id="example/tiny-llama", template="mpt-instruct.jinja"))


@pytest.fixture(scope="module")
def llama_snapshot(tiny_snapshot, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("snapshots") / "tiny-llama"
    config = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_snapshot / name, path / name)
    return path


@pytest.fixture
def tiny_llama(fresh_plugins):
    register_plugin(TinyLlamaPlugin(), name="tiny-llama")


@pytest.mark.parametrize(("requested", "engine", "in_use", "transformers_runs"), [
    ("sdpa", True, "sdpa", ENGINE_SDPA), ("auto", True, "sdpa", ENGINE_SDPA),
    ("eager", True, "eager", "eager"), ("sdpa", False, "sdpa", "sdpa"),
])
def test_backend_maps_to_transformers_attn_implementation(tiny_llama, llama_snapshot, requested, engine,
                                                          in_use, transformers_runs):
    info = log_llm("tiny-llama", snapshot=llama_snapshot, attention=requested, engine=engine,
                   name=f"llama-{requested}-{'engine' if engine else 'generate'}")
    loaded = mlflow.pyfunc.load_model(info.model_uri).unwrap_python_model()
    assert loaded.attention == in_use
    # On the engine, SDPA runs through the engine's attention function: transformers' own SDPA
    # but on the decode steps it attends per row (engine/attention.py).
    assert loaded.model.config._attn_implementation == transformers_runs


def test_a_backend_the_model_class_lacks_fails_at_log_time(fresh_plugins, tiny_snapshot):
    # The tiny MPT through the core's defaults alone: transformers' MPT class is eager-only.
    register_plugin(TinyLlamaPlugin(), name="tiny-llama")
    with pytest.raises(AttentionUnavailableError, match="MptForCausalLM .* does not implement .*'sdpa'"):
        log_llm("tiny-llama", snapshot=tiny_snapshot, attention="sdpa")


@pytest.mark.parametrize("model", ["mpt-instruct", "tiny-llama"])  # the MPT plugin's hook; the core's
def test_flash_is_refused_on_cpu_naming_what_it_needs(tiny_llama, tiny_snapshot, llama_snapshot, model):
    snapshot = tiny_snapshot if model == "mpt-instruct" else llama_snapshot
    with pytest.raises(AttentionUnavailableError, match="'flash' needs a CUDA GPU; this process runs on 'cpu'"):
        select_attention(get_model_spec(model), "flash", "cpu", snapshot)
