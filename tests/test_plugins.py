"""Plugin discovery: installed entry points, in-code plugins, broken and clashing plugins."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import textwrap
import types
from pathlib import Path

import mlflow
import pytest

from conftest import run_python
from templated_llm import ModelSpec, PluginError, UnknownModelError, hookimpl, log_llm
from templated_llm.plugins import manager as plugin_manager
from templated_llm.plugins.manager import (
    PLUGINS_ENV_VAR,
    PluginLoadWarning,
    get_model_spec,
    model_specs,
    plugin_load_errors,
    register_plugin,
)
from templated_llm.plugins.plugin_code import code_digest, package_dir
from templated_llm.runtime.loading import load_tokenizer, select_attention


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
    assert set(specs) == {"mpt-instruct"}  # the other installed plugins stay out


def _install(root: Path, entry_point: str, module: str, source: str) -> None:
    """Make ``module`` (``source``) look installed under ``root``, declaring ``entry_point``."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[templated_llm]\n{entry_point} = {module}\n")


@pytest.fixture
def broken_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed-looking distribution whose plugin module raises on import."""
    _install(tmp_path, "exploding", "exploding_plugin", "raise RuntimeError('boom at import')\n")
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


def test_a_second_distribution_under_an_installed_plugins_name_is_named_in_a_warning(
    tmp_path, monkeypatch, fresh_plugins
) -> None:
    (tmp_path / "my_mpt.py").write_text("")
    info = tmp_path / "my_mpt-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-mpt\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[templated_llm]\nmpt-instruct = my_mpt\n")
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])  # found after the shipped plugin
    plugin_manager.reset_plugin_manager()
    with pytest.warns(PluginLoadWarning, match=r"two installed distributions name a templated-llm plugin "
                                               r"'mpt-instruct': templated-llm-mpt \(templated_llm_mpt\) was "
                                               r"loaded and my-mpt \(my_mpt\) skipped"):
        model_specs()


def test_two_plugins_claiming_one_model_name_is_an_error_naming_both(fresh_plugins) -> None:
    class Impostor:
        @hookimpl
        def register_models(self, register):
            register(ModelSpec(name="mpt-instruct", repo_id="someone/else", template="x.jinja"))

    register_plugin(Impostor(), name="impostor")
    with pytest.raises(PluginError, match="'mpt-instruct' is registered by two plugins") as caught:
        get_model_spec("mpt-instruct")
    assert "'impostor'" in str(caught.value) and "'mpt-instruct'" in str(caught.value)
    # Only that name is in doubt: every other model is still served.
    assert "mpt-instruct" not in model_specs() and get_model_spec("llama2-chat").plugin_name == "llama2-chat"


def test_a_plugin_failing_to_register_its_models_leaves_the_others_served(fresh_plugins) -> None:
    class Broken:
        @hookimpl
        def register_models(self, register):
            raise RuntimeError("boom in register_models")

    class WrongType:
        @hookimpl
        def register_models(self, register):
            register({"name": "dict-model"})

    register_plugin(Broken(), name="broken")
    register_plugin(WrongType(), name="wrong-type")
    with pytest.warns(PluginLoadWarning, match="'broken' failed in hook 'register_models'"):
        assert get_model_spec("mpt-instruct").plugin_name == "mpt-instruct"
    errors = {e.name: e.error for e in plugin_load_errors()}
    assert errors["broken"] == "RuntimeError: boom in register_models"
    assert errors["wrong-type"] == "PluginError: register() takes a ModelSpec, received dict"
    with pytest.raises(UnknownModelError, match="plugin 'broken' failed to load: RuntimeError: boom"):
        get_model_spec("dict-model")


def test_a_plugin_raising_inside_a_hook_is_named_with_the_hook(fresh_plugins) -> None:
    class Faulty:
        @hookimpl(tryfirst=True)
        def load_tokenizer(self, spec, snapshot):
            raise OSError("disk on fire")

    register_plugin(Faulty(), name="faulty")
    spec = get_model_spec("mpt-instruct")
    with pytest.raises(PluginError, match="plugin 'faulty' failed in hook 'load_tokenizer'.*disk on fire"):
        load_tokenizer(spec, Path("."), trust_remote_code=False)


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


def test_every_plugins_prepare_model_adjusts_the_loaded_model(fresh_plugins, logged_model) -> None:
    class Adjusts:
        def __init__(self, mark: str) -> None:
            self.mark = mark

        @hookimpl
        def prepare_model(self, spec, model, tokenizer):
            if spec.name == "mpt-instruct":
                marks = getattr(model, "prepared_by", [])
                model.prepared_by = [*marks, (self.mark, tokenizer.padding_side)]

    register_plugin(Adjusts("first"), name="first")
    register_plugin(Adjusts("second"), name="second")
    model = mlflow.pyfunc.load_model(logged_model.model_uri).unwrap_python_model().model
    # Not first-result: both ran (last registered first), on the prepared tokenizer.
    assert model.prepared_by == [("second", "left"), ("first", "left")]


def test_a_hook_wrapper_is_refused_when_its_plugin_registers(fresh_plugins) -> None:
    class Wrapping:
        @hookimpl(wrapper=True)
        def load_model(self, spec, snapshot):
            return (yield)

    with pytest.raises(PluginError, match="'wrapping' implements hook 'load_model' as a wrapper"):
        register_plugin(Wrapping(), name="wrapping")
    assert "wrapping" not in plugin_manager.plugin_names()


def test_select_attention_must_answer_a_backend_of_the_table(fresh_plugins) -> None:
    class Undecided:
        @hookimpl(tryfirst=True)
        def select_attention(self, spec, requested):
            return requested

    register_plugin(Undecided(), name="undecided")
    spec = get_model_spec("mpt-instruct")
    assert select_attention(spec, "sdpa", "cpu", None) == "sdpa"
    with pytest.raises(PluginError, match=r"plugin 'undecided' answered hook 'select_attention' for "
                                          r"model 'mpt-instruct' with a str, 'auto'; it must answer a "
                                          r"name of the attention table"):
        select_attention(spec, "auto", "cpu", None)


def test_the_plugins_command_shows_distributions_models_hooks_and_load_errors(
    broken_distribution, fresh_plugins, capsys
) -> None:
    from templated_llm.cli import main

    plugin_manager.reset_plugin_manager()
    with pytest.warns(PluginLoadWarning):
        assert main(["plugins", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    mpt = records["mpt-instruct"]
    assert (mpt["distribution"], mpt["version"], mpt["error"]) == ("templated-llm-mpt", "0.1.0", None)
    assert [(m["name"], m["repo_id"], m["template"]) for m in mpt["models"]] == [
        ("mpt-instruct", "mosaicml/mpt-7b-instruct", "mpt-instruct.jinja")]
    assert {"register_models", "select_attention", "configure_attention"} <= set(mpt["hooks"])
    assert "prepare_model" in records["dolly-v2"]["hooks"]
    assert records["exploding"]["error"] == "exploding_plugin: RuntimeError: boom at import"

    assert main(["plugins"]) == 0
    shown = capsys.readouterr().out
    assert "mpt-instruct: mpt-instruct\n  distribution: templated-llm-mpt 0.1.0\n" in shown
    assert "  model mpt-instruct: mosaicml/mpt-7b-instruct, template mpt-instruct.jinja\n" in shown
    assert "exploding: FAILED TO LOAD (exploding_plugin: RuntimeError: boom at import)" in shown


def test_two_instances_of_one_plugin_class_are_told_apart(fresh_plugins, tmp_path) -> None:
    template = tmp_path / "echo.jinja"
    template.write_text("{{ prompt }}")
    register_plugin(EchoPlugin(template), name="echo")
    register_plugin(EchoPlugin(template), name="echo-again")
    with pytest.raises(PluginError, match="registered by two plugins: 'echo-again' and 'echo'"):
        get_model_spec("echo-chat")


def test_an_installed_plugin_implementing_no_hook_of_ours_is_skipped_with_the_hook_it_meant(
    tmp_path, monkeypatch, fresh_plugins
) -> None:
    _install(tmp_path, "misspelt", "misspelt_plugin",
             "from templated_llm import hookimpl\n\n\n@hookimpl\ndef prompt_templat(spec):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin_manager.reset_plugin_manager()
    with pytest.warns(PluginLoadWarning, match="'misspelt'.*failed to load"):
        specs = model_specs()
    assert "mpt-instruct" in specs and "misspelt" not in plugin_manager.plugin_names()
    [error] = plugin_load_errors()
    assert error.name == "misspelt"
    assert ("PluginError: plugin 'misspelt' implements 'prompt_templat', which is not a "
            "templated-llm hook (did you mean 'prompt_template'?); the hooks: ") in error.error
    assert "register_models" in error.error and "engine_adapter" in error.error


def test_a_plugin_registered_in_code_with_an_unknown_hook_or_argument_is_refused(fresh_plugins) -> None:
    class Misspelt:
        @hookimpl
        def load_tokeniser(self, spec, snapshot):
            return None

    class ExtraArgument:
        @hookimpl
        def prompt_template(self, spec, model):
            return None

    with pytest.raises(PluginError, match=r"plugin 'misspelt' implements 'load_tokeniser', which is "
                                          r"not a templated-llm hook \(did you mean 'load_tokenizer'\?\)"):
        register_plugin(Misspelt(), name="misspelt")
    with pytest.raises(PluginError, match=r"plugin 'extra' implements hook 'prompt_template' with "
                                          r"arguments \['model'\] the hook does not pass; it passes "
                                          r"\['spec'\]"):
        register_plugin(ExtraArgument(), name="extra")
    assert not {"misspelt", "extra"} & set(plugin_manager.plugin_names())


def test_a_plugin_name_already_taken_is_refused_naming_it(fresh_plugins, tmp_path) -> None:
    template = tmp_path / "echo.jinja"
    template.write_text("{{ prompt }}")
    register_plugin(EchoPlugin(template), name="echo")
    with pytest.raises(PluginError, match="a plugin named 'echo' is already registered"):
        register_plugin(EchoPlugin(template), name="echo")


def _answering(hook: str, answer: object) -> object:
    """A plugin whose ``hook`` answers ``answer`` first, for every model."""
    def implementation(self, spec):
        return answer

    return type("Answering", (), {hook: hookimpl(tryfirst=True)(implementation)})()


@pytest.mark.parametrize(("hook", "answer", "allowed"), [
    ("load_tokenizer", {"eos_token": "</s>"}, "a transformers tokenizer (PreTrainedTokenizerBase)"),
    ("load_model", "model.safetensors", "a torch.nn.Module: the loaded causal LM"),
    ("configure_attention", "flash_attention_2", "the attention backend now in use, a name of the "
                                                 "attention table: ['eager', 'sdpa', 'triton', 'flash']"),
    ("engine_adapter", object(), "a templated_llm.engine.ModelAdapter, or None"),
])
def test_a_load_hook_answering_the_wrong_type_is_named_with_what_it_must_answer(
    logged_model, fresh_plugins, hook, answer, allowed
) -> None:
    register_plugin(_answering(hook, answer), name="wrong")
    with pytest.raises(PluginError) as caught:
        mlflow.pyfunc.load_model(logged_model.model_uri, model_config={"device": "cpu"})
    assert str(caught.value) == (
        f"plugin 'wrong' answered hook {hook!r} for model 'mpt-instruct' with a "
        f"{type(answer).__name__}, {answer!r}; it must answer {allowed}")


@pytest.mark.parametrize(("hook", "answer", "allowed"), [
    ("prompt_template", ["mpt-instruct.jinja"], "the path of a Jinja template file (a str or a Path)"),
    ("needs_remote_code", True, "a str saying why, or None"),
])
def test_a_log_hook_answering_the_wrong_type_is_refused_at_log_time(
    fresh_plugins, tiny_snapshot, hook, answer, allowed
) -> None:
    register_plugin(_answering(hook, answer), name="wrong")
    with pytest.raises(PluginError) as caught:
        log_llm("mpt-instruct", snapshot=tiny_snapshot)
    assert str(caught.value) == (
        f"plugin 'wrong' answered hook {hook!r} for model 'mpt-instruct' with a "
        f"{type(answer).__name__}, {answer!r}; it must answer {allowed}")


def test_a_plugin_in_no_file_is_refused_at_log_time(fresh_plugins, tiny_snapshot, monkeypatch) -> None:
    module = types.ModuleType("fileless_plugin")  # built in memory: no file to travel with a model
    exec(textwrap.dedent("""
        from templated_llm import ModelSpec, hookimpl

        class Plugin:
            @hookimpl
            def register_models(self, register):
                register(ModelSpec(name="fileless-model", repo_id="o/m", template="mpt-instruct.jinja"))
    """), module.__dict__)
    monkeypatch.setitem(sys.modules, "fileless_plugin", module)
    register_plugin(module.Plugin(), name="fileless")
    with pytest.raises(PluginError, match="plugin 'fileless' is defined in module 'fileless_plugin', "
                                          "which is in no file that could travel with the model"):
        log_llm("fileless-model", snapshot=tiny_snapshot)


@pytest.mark.parametrize("names", [("my_plugin_a", "my_plugin_b"),  # as models logged before content naming
                                   ("templated_llm_plugin_aaa", "templated_llm_script_bbb")])
def test_a_model_name_another_shipped_module_serves_is_refused_whatever_the_modules_names(
        fresh_plugins, tmp_path, monkeypatch, names):
    # Each module is a logged model's plugin code; the second would silently run the first's hooks.
    for name in names:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
            from templated_llm import ModelSpec, hookimpl, register_plugin

            class Plugin:
                @hookimpl
                def register_models(self, register):
                    register(ModelSpec(name="shared-model", repo_id="x/{name}", template="mpt-instruct.jinja"))

            register_plugin(Plugin(), name="notebook")
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    first, second = names
    assert get_model_spec("shared-model", first).repo_id == f"x/{first}"
    with pytest.raises(PluginError, match=rf"served in this process by the plugin code another logged "
                                          rf"model carried \({first}\); this model carries its own \({second}\)"):
        get_model_spec("shared-model", second)
    for name in names:
        sys.modules.pop(name, None)


PACKAGE_PLUGIN = '''
from templated_llm import ModelSpec, hookimpl, register_plugin


class Plugin:
    @hookimpl
    def register_models(self, register):
        register(ModelSpec(name={model!r}, repo_id="x/{copy}", template="mpt-instruct.jinja"))


register_plugin(Plugin(), name="packaged")
'''


def _package_copy(tmp_path: Path, copy: str, model: str) -> tuple[Path, str]:
    """A plugin package named ``acme_pkg`` in folder ``copy``, as a logged model carries it, and
    the digest log_llm records of it."""
    package = tmp_path / copy / "acme_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(PACKAGE_PLUGIN.format(model=model, copy=copy))
    return package.parent, code_digest(package)


@pytest.fixture
def acme_pkg_unloaded():
    yield
    for name in [m for m in sys.modules if m == "acme_pkg" or m.startswith("acme_pkg.")]:
        del sys.modules[name]


@pytest.mark.parametrize("second_model", ["pkg-model", "other-pkg-model"])
def test_a_package_of_the_name_another_model_carried_with_other_code_is_refused(
        fresh_plugins, tmp_path, monkeypatch, acme_pkg_unloaded, second_model):
    # Where MLflow loads a model it puts the model's code first on sys.path; Python still
    # imports acme_pkg once, so the second model would run the first one's package.
    first, first_digest = _package_copy(tmp_path, "first", "pkg-model")
    second, second_digest = _package_copy(tmp_path, "second", second_model)
    monkeypatch.syspath_prepend(str(first))
    assert get_model_spec("pkg-model", "acme_pkg", first_digest).repo_id == "x/first"
    assert get_model_spec("pkg-model", "acme_pkg", first_digest).repo_id == "x/first"  # again: the same code
    monkeypatch.syspath_prepend(str(second))
    with pytest.raises(PluginError) as refused:
        get_model_spec(second_model, "acme_pkg", second_digest)
    assert str(refused.value) == (
        f"model {second_model!r} carries its plugin code as 'acme_pkg', but this process has already "
        f"imported a different 'acme_pkg', from {first / 'acme_pkg'} (the copy another logged model "
        "carried), and Python imports a module name once per process: this model would run that "
        "code instead of its own. Load the two models in separate processes, or give one of the "
        "two plugin packages another name.")


def test_an_installed_plugin_other_than_the_logged_code_runs_with_a_warning(fresh_plugins, caplog) -> None:
    installed = code_digest(package_dir("templated_llm_mpt"))
    with caplog.at_level("WARNING", logger="templated_llm.plugins.manager"):
        assert get_model_spec("mpt-instruct", "templated_llm_mpt", installed).plugin_module == "templated_llm_mpt"
        assert not caplog.records
        assert get_model_spec("mpt-instruct", "templated_llm_mpt", "0" * 16).plugin_module == "templated_llm_mpt"
    assert [r.getMessage() for r in caplog.records] == [
        "model 'mpt-instruct' was logged with other plugin code than the installed 'templated_llm_mpt' "
        f"it runs here (from {package_dir('templated_llm_mpt')}): a newer version of the plugin, say"]


def test_the_code_digest_reads_file_names_and_bytes_and_skips_compiled_caches(tmp_path) -> None:
    package = tmp_path / "pkg"
    (package / "__pycache__").mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    (package / "own.jinja").write_text("{{ prompt }}")
    digest = code_digest(package)
    (package / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"compiled")
    (package / "stale.pyc").write_bytes(b"compiled")
    assert code_digest(package) == digest
    (package / "own.jinja").write_text("{{ prompt }}!")
    assert code_digest(package) != digest
    (package / "own.jinja").write_text("{{ prompt }}")
    (package / "own.jinja").rename(package / "other.jinja")
    assert code_digest(package) != digest
