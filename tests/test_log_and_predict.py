"""log_llm -> a real MLflow store -> load (here and in a fresh process) -> predict."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jinja2
import mlflow
import pandas as pd
import pytest
import torch
import transformers
from mlflow.exceptions import MlflowException

from conftest import run_python
from templated_llm import hookimpl, log_llm
from templated_llm.plugins.manager import register_plugin, unregister_plugin
from templated_llm.runtime.pyfunc import TemplatedLLM

PROMPTS = ["What is machine learning?", "Name three rivers.", "Hi", "Explain {{ attention }} in layers."]
GREEDY = {"temperature": 0.0, "max_tokens": 12}


def _plain_generate(snapshot: Path, prompt: str, max_new_tokens: int) -> str:
    """The oracle: transformers alone, on the prompt rendered by plain Jinja."""
    template = (Path(__file__).parents[1] / "prompt_templates" / "mpt-instruct.jinja").read_text()
    text = jinja2.Template(template, keep_trailing_newline=True).render(prompt=prompt)
    tokenizer = transformers.AutoTokenizer.from_pretrained(snapshot)
    model = transformers.MptForCausalLM.from_pretrained(snapshot).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids
    output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                            pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def test_greedy_predict_in_a_fresh_process_equals_plain_generate(logged_model, tiny_snapshot):
    code = f"""
import json, mlflow
model = mlflow.pyfunc.load_model({logged_model.model_uri!r}, model_config={{"device": "cpu"}})
out = model.predict({{"prompt": {PROMPTS[:2]!r}}}, params={GREEDY!r})
print(json.dumps(out["candidates"].tolist()))
"""
    served = run_python(code)
    assert served == [_plain_generate(tiny_snapshot, p, GREEDY["max_tokens"]) for p in PROMPTS[:2]]


def test_batched_predict_equals_row_by_row(loaded_model):
    batched = loaded_model.predict(pd.DataFrame({"prompt": PROMPTS}), params=GREEDY)
    assert list(batched.columns) == ["candidates"]
    row_by_row = [loaded_model.predict([p], params=GREEDY)["candidates"][0] for p in PROMPTS]
    assert batched["candidates"].tolist() == row_by_row


def test_whole_batch_rows_go_through_one_generate_call_with_the_kv_cache(fallback_model, monkeypatch):
    loaded_model = fallback_model
    model = loaded_model.unwrap_python_model().model
    calls, step_lengths, logit_positions = [], [], []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1) or original(*a, **k))
    hooks = [
        model.register_forward_pre_hook(
            lambda module, args, kwargs: step_lengths.append(kwargs["input_ids"].shape[1]),
            with_kwargs=True),
        model.lm_head.register_forward_pre_hook(lambda module, args: logit_positions.append(args[0].shape[1])),
    ]
    try:
        loaded_model.predict(PROMPTS, params={"temperature": 0.0, "max_tokens": 5})
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [1]
    # The prompt is read once; every later step feeds one new token per row (cache on).
    assert step_lengths[0] > 1 and step_lengths[1:] == [1] * 4
    # Logits only for each step's last position: a long prompt's prefill is not a vocabulary-
    # sized product per token.
    assert logit_positions == [1] * 5


def test_temperature_zero_is_deterministic(loaded_model):
    first = loaded_model.predict(PROMPTS, params=GREEDY)
    assert loaded_model.predict(PROMPTS, params=GREEDY).equals(first)


def test_seed_gives_repeatable_samples_without_touching_global_rng(loaded_model):
    params = {"temperature": 1.0, "max_tokens": 16, "seed": 7}
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = loaded_model.predict(PROMPTS, params=params)
    assert torch.rand(1) == before  # the request's seed did not reset the process RNG
    assert loaded_model.predict(PROMPTS, params=params).equals(first)
    other = loaded_model.predict(PROMPTS, params={**params, "seed": 8})
    assert not other.equals(first)


@pytest.mark.parametrize("engine", [True, False])
def test_a_seeded_row_gets_what_it_gets_alone(loaded_model, fallback_model, engine):
    model = loaded_model if engine else fallback_model
    params = {"temperature": 1.0, "max_tokens": 8, "seed": 7}
    together = model.predict([PROMPTS[0], PROMPTS[0], PROMPTS[1]], params=params)["candidates"].tolist()
    alone = [model.predict([p], params=params)["candidates"][0] for p in (PROMPTS[0], PROMPTS[1])]
    assert together == [alone[0], alone[0], alone[1]]


def test_stop_strings_end_the_completion_before_the_stop(loaded_model):
    full = loaded_model.predict(["Name three rivers."], params=GREEDY)["candidates"][0]
    stop = full[4:7]
    assert len(stop.strip()) > 0, full
    cut = loaded_model.predict(["Name three rivers."], params={**GREEDY, "stop": [stop]})
    assert cut["candidates"][0] == full[: full.find(stop)]


def test_max_tokens_bounds_the_completion(loaded_model):
    python_model = loaded_model.unwrap_python_model()
    out = loaded_model.predict(PROMPTS, params={"temperature": 0.0, "max_tokens": 3})
    for text in out["candidates"]:
        assert len(python_model.tokenizer(text).input_ids) <= 4  # re-tokenising may split once


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "at most 1024"),
        ({"top_p": 2.0}, "top_p"),
        ({"top_k": -3}, "top_k"),
    ],
)
def test_bad_params_through_pyfunc_are_invalid_parameter_errors(loaded_model, params, message):
    with pytest.raises(MlflowException, match=message) as caught:
        loaded_model.predict(["hi"], params=params)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_the_logged_model_carries_signature_example_requirements_and_code(logged_model):
    model = mlflow.models.Model.load(logged_model.model_uri)
    assert model.signature.inputs is None  # predict validates inputs itself (any form)
    # What every call returns: the usage columns come only with the param return_usage (and
    # spark_udf's default result type reads every column the schema lists).
    assert model.signature.outputs.input_names() == ["candidates"]
    params = {p.name: p.default for p in model.signature.params.params}
    assert params["temperature"] == 0.1  # the plugin's default
    assert params["max_tokens"] is None  # the plugin's 256, or what the context leaves
    assert set(params) == {"temperature", "max_tokens", "top_p", "top_k", "repetition_penalty",
                           "stop", "seed", "return_usage", "response_format"}
    assert params["response_format"] == {"type": "text"}
    assert model.load_input_example() is not None
    local = Path(mlflow.artifacts.download_artifacts(logged_model.model_uri))
    requirements = (local / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert f"transformers=={transformers.__version__}" in requirements
    assert any(r.startswith("accelerate==") for r in requirements)
    assert any(r.startswith("llguidance==") for r in requirements)  # structured output
    code = local / "code"
    assert (code / "templated_llm" / "runtime" / "pyfunc.py").is_file()
    assert (code / "templated_llm_mpt" / "__init__.py").is_file()
    # What load_context reads to find the plugin and rebuild the model, as logged.
    config = model.flavors["python_function"]["config"]
    assert {k: config[k] for k in ("model", "plugin", "plugin_module", "attention", "pack_weights")} == {
        "model": "mpt-instruct", "plugin": "mpt-instruct", "plugin_module": "templated_llm_mpt",
        "attention": "auto", "pack_weights": True}
    assert config["generation_defaults"]["max_tokens"] == 256
    weights = local / "artifacts" / "tiny-mpt" / "model.safetensors"
    assert weights.is_file() and not weights.is_symlink()


def test_the_attention_backend_in_use_can_be_read_from_the_loaded_model(loaded_model):
    python_model = loaded_model.unwrap_python_model()
    assert python_model.attention == "sdpa"  # what 'auto' picks on CPU
    assert python_model.device == "cpu"
    assert python_model.model.dtype == torch.float32


class _LoadRecorder:
    """Sees every model load first (tryfirst) and lets the real plugin do it."""

    def __init__(self) -> None:
        self.loads = 0

    @hookimpl(tryfirst=True)
    def load_model(self, spec, snapshot, dtype, device, attention):
        self.loads += 1


def test_logging_loads_no_weights_and_copies_them_once(tiny_snapshot, monkeypatch):
    recorder = _LoadRecorder()
    register_plugin(recorder, name="load-recorder")
    weights = os.path.realpath(tiny_snapshot / "model.safetensors")
    copies = []
    copyfile = shutil.copyfile

    def counting_copyfile(src, dst, *args, **kwargs):
        if os.path.realpath(src) == weights:
            copies.append(dst)
        return copyfile(src, dst, *args, **kwargs)

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded while logging")

    monkeypatch.setattr(shutil, "copyfile", counting_copyfile)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", no_loading)
    monkeypatch.setattr(TemplatedLLM, "load_context", no_loading)
    try:
        info = log_llm("mpt-instruct", snapshot=tiny_snapshot, name="no-load")
    finally:
        unregister_plugin("load-recorder")
    assert recorder.loads == 0
    assert len(copies) == 1, copies
    assert info.model_uri.startswith("models:/")


def test_unknown_model_name_lists_available_models():
    from templated_llm import UnknownModelError

    with pytest.raises(UnknownModelError, match="mpt-instruct"):
        log_llm("no-such-model", snapshot=".")


def test_a_missing_snapshot_directory_is_rejected_before_logging(tmp_path):
    from templated_llm import SnapshotError

    with pytest.raises(SnapshotError, match="not a directory"):
        log_llm("mpt-instruct", snapshot=tmp_path / "missing")
    with pytest.raises(SnapshotError, match="config.json"):
        log_llm("mpt-instruct", snapshot=tmp_path)


def test_an_unknown_attention_backend_fails_at_log_time(tiny_snapshot):
    from templated_llm import AttentionUnavailableError

    with pytest.raises(AttentionUnavailableError, match="choose one of"):
        log_llm("mpt-instruct", snapshot=tiny_snapshot, attention="fastest")


def test_a_custom_template_replaces_the_plugins(tiny_snapshot, tmp_path):
    template = tmp_path / "terse.jinja"
    template.write_text("Q: {{ prompt }}\nA:")
    info = log_llm("mpt-instruct", snapshot=tiny_snapshot, template=template, name="terse")
    python_model = mlflow.pyfunc.load_model(info.model_uri).unwrap_python_model()
    assert python_model.render(["{{ x }}"]) == ["Q: {{ x }}\nA:"]


def test_a_loaded_model_runs_the_code_it_was_logged_with(logged_model):
    # templated-llm is installed here too: the model's own copy (its code_paths) must win.
    code = f"""
import json, sys, mlflow
mlflow.pyfunc.load_model({logged_model.model_uri!r})
print(json.dumps([sys.modules[m].__file__ for m in ("templated_llm", "templated_llm_mpt")]))
"""
    core, plugin = run_python(code)
    assert "/code/templated_llm/" in Path(core).as_posix()
    assert "/code/templated_llm_mpt/" in Path(plugin).as_posix()
