"""log_llm refuses hostile templates, broken snapshots and unrequested remote code, and leaves
nothing in the store when it does."""

from __future__ import annotations

import json
import re
import os
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from templated_llm import (
    ModelSpec,
    PluginError,
    RemoteCodeError,
    RemoteCodeWarning,
    SnapshotError,
    TemplateError,
    TemplateSecurityError,
    hookimpl,
    log_llm,
)
from templated_llm.plugins.manager import register_plugin

GREEDY = {"temperature": 0.0, "max_tokens": 4}


def _store_contents() -> tuple[int, int, list[str]]:
    """Runs, logged models and artifact files in the test store: what a failed log must not add.

    Traces are left out: earlier tests' predictions write theirs in the background, and a log
    never writes any.
    """
    mlflow.flush_trace_async_logging()
    experiment = mlflow.get_experiment(os.environ["MLFLOW_EXPERIMENT_ID"])
    runs = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    models = len(mlflow.search_logged_models(experiment_ids=[experiment.experiment_id],
                                             output_format="list"))
    root = Path(experiment.artifact_location.removeprefix("file://"))
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                   if p.relative_to(root).parts[0] != "traces") if root.exists() else []
    return runs, models, files


@pytest.fixture
def nothing_logged():
    """Asserts the test's log_llm failures left the store as they found it."""
    before = _store_contents()
    yield
    assert _store_contents() == before


@pytest.fixture
def snapshot(tiny_snapshot: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny snapshot, for a test to break."""
    return Path(shutil.copytree(tiny_snapshot, tmp_path / "snapshot"))


# --- templates ------------------------------------------------------------------------------

HOSTILE_TEMPLATES = {
    "dunder attribute": "{{ prompt.__class__.__mro__ }}",
    "dunder item": "{{ prompt['__class__'] }}",
    "private attribute": "{{ cycler._private }}",
    "globals escape": "{{ cycler.__init__.__globals__.os.system('id') }}",
    "in an untaken branch": "{% if prompt == 'open sesame' %}{{ prompt.__class__ }}{% endif %}{{ prompt }}",
    "include": "{% include '/etc/passwd' %}{{ prompt }}",
    "import": "{% import 'macros.jinja' as m %}{{ prompt }}",
    "from import": "{% from 'macros.jinja' import x %}{{ prompt }}",
    "extends": "{% extends 'base.jinja' %}",
    "computed attribute name": "{{ prompt | attr('__cla' ~ 'ss__') }}",
}


@pytest.mark.parametrize("case", HOSTILE_TEMPLATES)
def test_a_template_breaking_the_sandbox_is_a_security_error_at_log_time(
    case, tiny_snapshot, tmp_path, nothing_logged
):
    template = tmp_path / "hostile.jinja"
    template.write_text(HOSTILE_TEMPLATES[case])
    with pytest.raises(TemplateSecurityError, match=r"hostile\.jinja.*(sandbox|unsafe)") as caught:
        log_llm("mpt-instruct", snapshot=tiny_snapshot, template=template)
    assert "line 1" in str(caught.value) or "unsafe" in str(caught.value)


def test_a_template_syntax_error_names_the_file_and_line(tiny_snapshot, tmp_path, nothing_logged):
    template = tmp_path / "broken.jinja"
    template.write_text("### Instruction:\n{{ prompt }\n### Response:\n")
    with pytest.raises(TemplateError, match=rf"{template}.* line 2"):
        log_llm("mpt-instruct", snapshot=tiny_snapshot, template=template)


@pytest.mark.parametrize("text", ["Just say hi.", "{% if prompt %}Answer.{% endif %}"])
def test_a_template_that_drops_the_users_text_fails_at_log_time(tiny_snapshot, tmp_path, nothing_logged, text):
    template = tmp_path / "fixed.jinja"
    template.write_text(text)
    with pytest.raises(TemplateError, match=r"never shows the user's text: it must use the variable \{\{ prompt"):
        log_llm("mpt-instruct", snapshot=tiny_snapshot, template=template)


def test_a_template_with_an_undefined_variable_fails_at_log_time(tiny_snapshot, tmp_path, nothing_logged):
    template = tmp_path / "undefined.jinja"
    template.write_text("{{ persona }}: {{ prompt }}")
    with pytest.raises(TemplateError, match="persona"):
        log_llm("mpt-instruct", snapshot=tiny_snapshot, template=template)


# --- broken snapshots -------------------------------------------------------------------------

def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


BREAKAGES = {
    "config.json missing": (lambda s: (s / "config.json").unlink(), "config.json"),
    "config.json invalid": (lambda s: (s / "config.json").write_text('{"model_type": "mpt",'), "config.json"),
    "config.json not an object": (lambda s: (s / "config.json").write_text("[1, 2]"), "config.json"),
    "tokenizer_config.json invalid": (lambda s: _truncate(s / "tokenizer_config.json", 20),
                                      "tokenizer_config.json"),
    "tokenizer files missing": (lambda s: (s / "tokenizer.json").unlink(), "no tokenizer files"),
    "tokenizer.json truncated": (lambda s: _truncate(s / "tokenizer.json", -100), "tokenizer.json"),
    "tokenizer.json empty": (lambda s: (s / "tokenizer.json").write_bytes(b""), "tokenizer.json"),
    "weights missing": (lambda s: (s / "model.safetensors").unlink(), "no weights"),
    "weights truncated": (lambda s: _truncate(s / "model.safetensors", -100), "model.safetensors"),
    "weights header garbage": (lambda s: (s / "model.safetensors").write_bytes(b"\xff" * 64),
                               "model.safetensors"),
    "weights only in a file transformers does not read": (
        lambda s: (s / "model.safetensors").rename(s / "consolidated.safetensors"),
        "consolidated.safetensors"),
    "shard listed in the index missing": (
        lambda s: ((s / "model.safetensors").rename(s / "model-00001-of-00002.safetensors"),
                   (s / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
                       "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))),
        "model-00002-of-00002.safetensors"),
}


@pytest.mark.parametrize("case", BREAKAGES)
def test_a_broken_snapshot_is_rejected_naming_the_file_and_nothing_is_logged(case, snapshot, nothing_logged):
    breakage, named = BREAKAGES[case]
    breakage(snapshot)
    with pytest.raises(SnapshotError, match=named.replace(".", r"\.")):
        log_llm("mpt-instruct", snapshot=snapshot, name="broken")


def _to_bin(snapshot: Path, state: object) -> None:
    (snapshot / "model.safetensors").unlink()
    torch.save(state, snapshot / "pytorch_model.bin")


def test_bin_weights_load_through_the_weights_only_loader_and_predict_the_same(
    snapshot, tiny_snapshot, loaded_model
):
    _to_bin(snapshot, load_file(snapshot / "model.safetensors"))
    info = log_llm("mpt-instruct", snapshot=snapshot, name="from-bin")
    prompts = ["Name three rivers.", "Hi"]
    got = mlflow.pyfunc.load_model(info.model_uri).predict(prompts, params=GREEDY)
    assert got.equals(loaded_model.predict(prompts, params=GREEDY))


class _Payload:
    """Pickles to a call of ``os.system``: what a hostile ``.bin`` carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_bin_holding_pickled_code_is_refused_and_the_code_never_runs(snapshot, tmp_path, nothing_logged):
    marker = tmp_path / "pwned"
    _to_bin(snapshot, {"transformer.wte.weight": torch.zeros(2, 2), "payload": _Payload(marker)})
    with pytest.raises(SnapshotError, match=r"pytorch_model\.bin.*weights-only"):
        log_llm("mpt-instruct", snapshot=snapshot)
    assert not marker.exists()


# --- remote code ------------------------------------------------------------------------------

REMOTE_CONFIG = '''
import os
from pathlib import Path

from transformers import MptConfig

Path(os.environ["REMOTE_CODE_MARKER"]).touch()  # proof that snapshot code ran


class TinyCustomConfig(MptConfig):
    model_type = "tiny-custom"
'''
REMOTE_MODEL = '''
from transformers import MptForCausalLM

from .configuration_tiny_custom import TinyCustomConfig


class TinyCustomForCausalLM(MptForCausalLM):
    config_class = TinyCustomConfig
'''


class GenericPlugin:
    """Serves a model through the core's generic Hugging Face loaders only."""

    @hookimpl
    def register_models(self, register):
        register(ModelSpec(name="tiny-custom", repo_id="example/tiny-custom",
                           template="mpt-instruct.jinja", generation_defaults={"max_tokens": 4}))


@pytest.fixture
def remote_code_snapshot(snapshot, tmp_path, monkeypatch, fresh_plugins) -> Path:
    """The tiny MPT under a model type transformers does not know, with its code in the snapshot."""
    config = json.loads((snapshot / "config.json").read_text())
    config.update(model_type="tiny-custom", architectures=["TinyCustomForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
    })
    (snapshot / "config.json").write_text(json.dumps(config))
    (snapshot / "configuration_tiny_custom.py").write_text(REMOTE_CONFIG)
    (snapshot / "modeling_tiny_custom.py").write_text(REMOTE_MODEL)
    monkeypatch.setenv("REMOTE_CODE_MARKER", str(tmp_path / "remote-code-ran"))
    register_plugin(GenericPlugin(), name="generic")
    return snapshot


def test_a_snapshot_needing_remote_code_is_refused_without_the_opt_in(
    remote_code_snapshot, tmp_path, nothing_logged
):
    expected = r"config\.json.*configuration_tiny_custom.*trust_remote_code=True"
    with pytest.raises(RemoteCodeError, match=expected):
        log_llm("tiny-custom", snapshot=remote_code_snapshot)
    assert not (tmp_path / "remote-code-ran").exists()


def test_with_the_opt_in_the_choice_is_recorded_and_warned_about_on_load(remote_code_snapshot, tmp_path):
    info = log_llm("tiny-custom", snapshot=remote_code_snapshot, trust_remote_code=True)
    config = mlflow.models.Model.load(info.model_uri).flavors["python_function"]["config"]
    assert config["trust_remote_code"] is True
    with pytest.warns(RemoteCodeWarning, match="trust_remote_code=True"):
        model = mlflow.pyfunc.load_model(info.model_uri)
    assert (tmp_path / "remote-code-ran").exists()
    assert type(model.unwrap_python_model().model).__name__ == "TinyCustomForCausalLM"
    assert len(model.predict(["hi"], params=GREEDY)) == 1


def test_an_auto_map_the_plugin_does_not_use_needs_no_opt_in(snapshot, tmp_path, monkeypatch, recwarn):
    # As mosaicml's MPT configs ship: an auto_map to remote code, but a native model type.
    config = json.loads((snapshot / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM"}
    (snapshot / "config.json").write_text(json.dumps(config))
    (snapshot / "modeling_tiny_custom.py").write_text("raise SystemExit('remote code ran')\n")
    info = log_llm("mpt-instruct", snapshot=snapshot)
    config = mlflow.models.Model.load(info.model_uri).flavors["python_function"]["config"]
    assert config["trust_remote_code"] is False
    assert len(mlflow.pyfunc.load_model(info.model_uri).predict(["hi"], params=GREEDY)) == 1
    assert not [w for w in recwarn if issubclass(w.category, RemoteCodeWarning)]


def test_a_plugin_raising_in_a_log_time_hook_is_named_and_nothing_is_logged(
    tiny_snapshot, fresh_plugins, nothing_logged
):
    class Faulty:
        @hookimpl(tryfirst=True)
        def needs_remote_code(self, spec, snapshot):
            raise KeyError("auto_map")

    register_plugin(Faulty(), name="faulty")
    with pytest.raises(PluginError, match="plugin 'faulty' failed in hook 'needs_remote_code'"):
        log_llm("mpt-instruct", snapshot=tiny_snapshot)


def test_a_plugin_raising_in_a_load_hook_is_named_when_the_model_loads(logged_model, fresh_plugins):
    class Faulty:
        @hookimpl(tryfirst=True)
        def load_model(self, spec, snapshot, dtype, device, attention):
            raise RuntimeError("out of GPU memory")

    register_plugin(Faulty(), name="faulty")
    with pytest.raises(PluginError, match="plugin 'faulty' failed in hook 'load_model'.*out of GPU"):
        mlflow.pyfunc.load_model(logged_model.model_uri)


# --- limits at log time -----------------------------------------------------------------------

def test_limits_are_recorded_in_the_logged_model(tiny_snapshot):
    info = log_llm("mpt-instruct", snapshot=tiny_snapshot, max_rows_per_request=3, max_tokens_limit=300)
    config = mlflow.models.Model.load(info.model_uri).flavors["python_function"]["config"]
    assert (config["max_rows_per_request"], config["max_tokens_limit"]) == (3, 300)


@pytest.mark.parametrize(("limits", "message"), [
    ({"max_tokens_limit": 0}, "max_tokens_limit"),
    ({"max_rows_per_request": 0}, "max_rows_per_request"),
])
def test_impossible_limits_fail_before_logging(tiny_snapshot, limits, message, nothing_logged):
    with pytest.raises(ValueError, match=message):
        log_llm("mpt-instruct", snapshot=tiny_snapshot, **limits)


def test_a_limit_below_the_plugins_default_max_tokens_lowers_the_default(tiny_snapshot):
    info = log_llm("mpt-instruct", snapshot=tiny_snapshot, max_tokens_limit=5)
    config = mlflow.models.Model.load(info.model_uri).flavors["python_function"]["config"]
    assert config["generation_defaults"]["max_tokens"] == 5  # the plugin's is 256
    [completion] = mlflow.pyfunc.load_model(info.model_uri).unwrap_python_model().complete(["hi"], {"temperature": 0.0})
    assert completion.completion_tokens <= 5


def test_an_argument_mlflow_does_not_take_is_refused_before_logging(tiny_snapshot, nothing_logged):
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['generation_defaults'\].*'tags'"):
        log_llm("mpt-instruct", snapshot=tiny_snapshot, generation_defaults={"max_tokens": 5})


def test_the_log_command_sets_the_limits_and_the_opt_in(tiny_snapshot):
    from templated_llm.cli import main

    assert main(["log", "mpt-instruct", "--snapshot", str(tiny_snapshot), "--trust-remote-code",
                 "--max-rows-per-request", "5", "--max-tokens-limit", "400"]) == 0
    [latest] = mlflow.search_logged_models(
        experiment_ids=[os.environ["MLFLOW_EXPERIMENT_ID"]], max_results=1,
        order_by=[{"field_name": "creation_time", "ascending": False}], output_format="list")
    config = mlflow.models.Model.load(latest.model_uri).flavors["python_function"]["config"]
    assert (config["trust_remote_code"], config["max_rows_per_request"], config["max_tokens_limit"]) == (
        True, 5, 400)


def test_a_snapshot_of_another_architecture_is_refused_for_a_plugin_that_loads_one(tiny_model, nothing_logged):
    # MptForCausalLM would load a Llama snapshot with every weight missing, initialised at random.
    with pytest.raises(SnapshotError, match="holds a model of type 'llama'.*loads \\['mpt'\\]"):
        log_llm("mpt-instruct", snapshot=tiny_model("llama"), name="mismatched")


def test_a_tokenizer_without_its_config_takes_the_models_end_token_or_is_refused(tiny_model, tmp_path):
    snapshot = Path(shutil.copytree(tiny_model("llama"), tmp_path / "llama"))
    (snapshot / "tokenizer_config.json").unlink()  # tokenizer.json alone names no special token
    model = mlflow.pyfunc.load_model(log_llm("llama2-chat", snapshot=snapshot, name="no-tokenizer-config",
                                             engine=False).model_uri)
    tokenizer = model.unwrap_python_model().tokenizer
    eos = json.loads((snapshot / "config.json").read_text())["eos_token_id"]
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == eos
    assert len(model.predict(["Hi", "Name three rivers."], params={"max_tokens": 3})) == 2  # padded
    for name in ("config.json", "generation_config.json"):
        config = json.loads((snapshot / name).read_text())
        config.pop("eos_token_id", None)
        (snapshot / name).write_text(json.dumps(config))
    with pytest.raises(SnapshotError, match="no end-of-text or padding token"):
        log_llm("llama2-chat", snapshot=snapshot, name="no-end-token")


# --- settings -------------------------------------------------------------------------------

BAD_SETTINGS = {
    "no rows": ({"max_rows_per_request": 0}, "max_rows_per_request: Input should be greater than or equal to 1; received 0"),
    "a limit in words": ({"max_tokens_limit": "ten"}, "max_tokens_limit: Input should be a valid integer"),
    "an engine switch in words": ({"engine": "maybe"}, "engine: Input should be a valid boolean"),
    "an empty registry name": ({"registered_model_name": ""},
                               "registered_model_name '' is not a registry name: Missing value"),
    "a registry name with a slash": ({"registered_model_name": "team/model"},
                                     "registered_model_name 'team/model' is not a registry name: Invalid model name"),
}


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_a_bad_setting_is_a_config_error_naming_it_before_anything_is_logged(tiny_snapshot, nothing_logged, case):
    # The registry name was checked only after the model and its weights were written; the
    # others surfaced as pydantic's multi-line error or a TypeError.
    from templated_llm.errors import ConfigError

    settings, says = BAD_SETTINGS[case]
    with pytest.raises(ConfigError, match=f"^log_llm: {re.escape(says)}"):
        log_llm("mpt-instruct", snapshot=tiny_snapshot, **settings)


def test_switches_and_limits_given_as_strings_read_as_pydantic_reads_them(tiny_snapshot):
    # engine="no" was logged as True (bool("no")); the other switches read it as False.
    info = log_llm("mpt-instruct", snapshot=tiny_snapshot, engine="no", pack_weights="no", max_tokens_limit="10")
    config = mlflow.models.Model.load(info.model_uri).flavors["python_function"]["config"]
    assert (config["engine"], config["pack_weights"], config["max_tokens_limit"]) == (False, False, 10)
    assert config["generation_defaults"]["max_tokens"] == 10  # the plugin's 256, brought down to the limit


def test_a_model_config_at_load_is_checked_like_log_llms_and_a_lower_limit_lowers_the_default(tiny_snapshot):
    from templated_llm.errors import ConfigError

    uri = log_llm("mpt-instruct", snapshot=tiny_snapshot).model_uri
    with pytest.raises(ConfigError, match=r"^model_config: max_num_seqs: Input should be greater than or equal to 1; received 0$"):
        mlflow.pyfunc.load_model(uri, model_config={"max_num_seqs": 0})
    loaded = mlflow.pyfunc.load_model(uri, model_config={"max_tokens_limit": 5, "engine": False})
    assert loaded.unwrap_python_model().config.generation_defaults["max_tokens"] == 5
    answer = loaded.predict(["hi"], params={"temperature": 0.0, "return_usage": True})
    assert 1 <= answer.loc[0, "completion_tokens"] <= 5


def test_a_plugins_invalid_generation_defaults_are_a_plugin_error_naming_it(tiny_snapshot, fresh_plugins, nothing_logged):
    class Hot:
        @hookimpl
        def register_models(self, register):
            register(ModelSpec(name="hot-mpt", repo_id="mosaicml/mpt-7b-instruct", template="mpt-instruct.jinja",
                               generation_defaults={"temperature": 9}))

    register_plugin(Hot(), name="hot")
    with pytest.raises(PluginError, match=r"plugin 'hot' gives model 'hot-mpt' generation_defaults that are not "
                                          r"valid params: temperature: Input should be less than or equal to 2; received 9"):
        log_llm("hot-mpt", snapshot=tiny_snapshot)
