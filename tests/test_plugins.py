"""Plugin discovery: installed entry points, in-code plugins, broken and clashing plugins."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import mlflow
import pytest

from conftest import run_python
from templated_llm import ModelSpec, PluginError, UnknownModelError, hookimpl, log_llm
from templated_llm.plugins import manager as plugin_manager
from templated_llm.plugins.manager import (
    PLUGINS_ENV_VAR,
    PluginLoadWarning,
    call_first,
    get_model_spec,
    model_specs,
    plugin_load_errors,
    register_plugin,
)


def test_the_mpt_plugin_is_found_through_its_installed_entry_point() -> None:
    distribution = importlib.metadata.distribution("templated-llm-mpt")
    assert [(ep.group, ep.name, ep.value) for ep in distribution.entry_points] == [
        ("templated_llm", "mpt-instruct", "templated_llm_mpt")
    ]
    found = run_python(
        "import json; from templated_llm.plugins.manager import model_specs; "
        "s = model_specs()['mpt-instruct']; "
        "print(json.dumps([s.plugin_name, s.plugin_module, s.repo_id]))"
    )
    assert found == ["mpt-instruct", "templated_llm_mpt", "mosaicml/mpt-7b-instruct"]


def test_without_its_entry_point_the_core_does_not_know_the_mpt_model() -> None:
    names = run_python(
        "import json; from templated_llm.plugins.manager import model_specs; "
        "print(json.dumps(sorted(model_specs())))",
        env={PLUGINS_ENV_VAR: ""},
    )
    assert names == []


def test_the_environment_variable_chooses_entry_point_plugins(fresh_plugins, monkeypatch) -> None:
    monkeypatch.setenv(PLUGINS_ENV_VAR, "mpt-instruct, not-installed")
    plugin_manager.reset_plugin_manager()
    with pytest.warns(PluginLoadWarning, match="not-installed"):
        specs = model_specs()
    assert "mpt-instruct" in specs


@pytest.fixture
def broken_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed-looking distribution whose plugin module raises on import."""
    (tmp_path / "exploding_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    info = tmp_path / "exploding_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: exploding-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[templated_llm]\nexploding = exploding_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_broken_plugin_is_skipped_reported_and_the_others_still_work(
    broken_distribution, fresh_plugins
) -> None:
    plugin_manager.reset_plugin_manager()
    with pytest.warns(PluginLoadWarning, match="'exploding'.*boom at import"):
        specs = model_specs()
    assert "mpt-instruct" in specs
    [error] = plugin_load_errors()
    assert (error.name, error.entry_point) == ("exploding", "exploding_plugin")
    assert "RuntimeError: boom at import" in error.error
    with pytest.raises(UnknownModelError, match="'exploding' failed to load"):
        get_model_spec("exploding-model")


def test_two_plugins_claiming_one_model_name_is_an_error_naming_both(fresh_plugins) -> None:
    class Impostor:
        @hookimpl
        def register_models(self, register):
            register(ModelSpec(name="mpt-instruct", repo_id="someone/else", template="x.jinja"))

    register_plugin(Impostor(), name="impostor")
    with pytest.raises(PluginError, match="'mpt-instruct' is registered by two plugins") as caught:
        model_specs()
    assert "'impostor'" in str(caught.value) and "'mpt-instruct'" in str(caught.value)


def test_a_plugin_raising_inside_a_hook_is_named_with_the_hook(fresh_plugins) -> None:
    class Faulty:
        @hookimpl(tryfirst=True)
        def load_tokenizer(self, spec, snapshot):
            raise OSError("disk on fire")

    register_plugin(Faulty(), name="faulty")
    spec = get_model_spec("mpt-instruct")
    with pytest.raises(PluginError, match="plugin 'faulty' failed in hook 'load_tokenizer'.*disk on fire"):
        call_first("load_tokenizer", spec=spec, snapshot=Path("."))


class EchoPlugin:
    """A plugin defined in code: a new model served by the core's generic Hugging Face hooks."""

    def __init__(self, template: Path) -> None:
        self.template = template

    @hookimpl
    def register_models(self, register):
        register(ModelSpec(name="echo-chat", repo_id="example/echo", template=str(self.template),
                           generation_defaults={"max_tokens": 4}))


def test_a_plugin_registered_in_code_logs_and_serves(fresh_plugins, tiny_snapshot, tmp_path) -> None:
    template = tmp_path / "echo.jinja"
    template.write_text("User: {{ prompt }}\nAssistant:")
    register_plugin(EchoPlugin(template), name="echo")
    spec = get_model_spec("echo-chat")
    assert (spec.plugin_name, spec.plugin_module) == ("echo", __name__)

    info = log_llm("echo-chat", snapshot=tiny_snapshot, name="echo")
    model = mlflow.pyfunc.load_model(info.model_uri)
    python_model = model.unwrap_python_model()
    assert python_model.render(["hi"]) == ["User: hi\nAssistant:"]
    assert python_model.attention == "eager"  # transformers' only choice for MPT
    out = model.predict(["hi", "there"], params={"temperature": 0.0})
    assert out["candidates"].map(type).tolist() == [str, str]
