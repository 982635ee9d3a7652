"""The templated-llm command line calls the Python API and reports errors without traces."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import mlflow
import pytest
import requests

from local_server import free_port, running_server
from templated_llm.cli import _parser
from templated_llm.devtools.scaffold import write_plugin
from templated_llm.devtools.tiny import ARCHITECTURES, ZEPHYR_CHAT_TEMPLATE
from templated_llm.errors import TemplatedLLMError


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "templated_llm.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_plugins_lists_plugins_and_their_models() -> None:
    result = _cli("plugins")
    assert result.returncode == 0, result.stderr
    assert "mpt-instruct: mpt-instruct" in result.stdout


def test_log_prints_the_model_uri_and_the_serve_command(tiny_snapshot) -> None:
    result = _cli("log", "mpt-instruct", "--snapshot", str(tiny_snapshot), "--attention", "eager",
                  "--no-pack-weights")
    assert result.returncode == 0, result.stderr
    uri, serve = result.stdout.strip().splitlines()[-2:]
    assert uri.startswith("models:/m-")
    assert f"templated-llm serve {uri}" in serve
    config = mlflow.models.Model.load(uri).flavors["python_function"]["config"]
    assert (config["attention"], config["pack_weights"]) == ("eager", False)


def test_errors_are_one_line_and_exit_1(tiny_snapshot) -> None:
    result = _cli("log", "no-such-model", "--snapshot", str(tiny_snapshot))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: no installed templated-llm plugin")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["build-tiny-model", "new-plugin", "render", "plugins", "log",
                                     "serve", "demo"])
def test_every_option_has_help(command: str) -> None:
    subparsers = next(a for a in _parser()._actions if a.dest == "command")
    for action in subparsers.choices[command]._actions:
        assert action.help, f"{command} {action.dest} has no help"


@pytest.mark.parametrize(("options", "says"), [
    (["--workers", "2"], "--workers and --env-manager go with --mlflow-only"),
    (["--mlflow-only", "--api-key", "k", "--max-body-bytes", "10"],
     "--api-key, --max-body-bytes apply to templated-llm's own server, not to --mlflow-only"),
    (["--max-n", "0"], "max_n must be positive; received 0"),
])
def test_serve_refuses_options_that_do_not_fit(options, says) -> None:
    result = _cli("serve", "models:/m/1", *options)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(f"error: {says}")


@pytest.mark.parametrize(("options", "says"), [
    (["--port", "99999"], "port must be 1-65535; received 99999"),
    (["--port", "0", "--mlflow-only"], "port must be 1-65535; received 0"),
    (["--port", "http"], "not a port number: 'http'"),
])
def test_serve_refuses_a_port_no_server_can_listen_on(options, says) -> None:
    result = _cli("serve", "models:/m/1", *options)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"templated-llm serve: error: argument --port: {says}"


@pytest.mark.slow
def test_serve_exits_1_when_the_model_does_not_load() -> None:
    result = _cli("serve", "models:/no-such-model/1", "--port", str(free_port()))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: loading models:/no-such-model/1 failed: Registered Model with name=no-such-model not found")


@pytest.mark.slow
def test_the_demo_prints_a_serve_command_that_works_without_activating_the_venv(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PATH="/usr/bin:/bin", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    demo = subprocess.run([sys.executable, "-m", "templated_llm.cli", "demo", "--snapshot", str(tmp_path / "tiny")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    command = next(line for line in demo.stdout.splitlines() if " serve models:/" in line).split()
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    with running_server(command, port, env=env, cwd=str(tmp_path)) as url:
        body = {"model": "mpt-instruct", "prompt": "Hi", "max_tokens": 2}
        assert requests.post(f"{url}/v1/completions", json=body, timeout=120).status_code == 200


def test_render_prints_the_exact_prompt_with_system_and_variables() -> None:
    result = _cli("render", "llama2-chat", "--prompt", "Name three rivers.", "--system", "Be brief.")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName three rivers. [/INST]"
    result = _cli("render", "dolly-v2", "--prompt", "Sum up.", "--var", "context=The Nile.")
    assert result.stdout.endswith("### Instruction:\nSum up.\n\nInput:\nThe Nile.\n\n### Response:\n")


def test_render_with_a_snapshot_shows_the_tokens_the_tokenizer_adds(tiny_model) -> None:
    messages = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."},
                           {"role": "user", "content": "Bye"}])
    result = _cli("render", "mistral-instruct", "--messages", messages,
                  "--snapshot", str(tiny_model("mistral")))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "<s>[INST] Hi [/INST] Yo.</s>[INST] Bye [/INST]"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hf-chat", "--prompt", "hi"], "pass the snapshot"),
        (["llama2-chat", "--messages", '[{"role": "bot", "content": "hi"}]'], "role 'bot'"),
        (["mpt-instruct", "--prompt", "hi", "--var", "system=x"], "no template variables ['system']"),
        (["mpt-instruct", "--prompt", "hi", "--var", "system"], "NAME=VALUE"),
        (["mpt-instruct"], "either --prompt or --messages"),
        (["llama2-chat", "--messages", "[{"], "--messages is not JSON"),
    ],
)
def test_render_errors_are_one_line(args, message) -> None:
    result = _cli("render", *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message in result.stderr


def test_render_with_a_snapshot_that_is_not_a_directory_says_so(tmp_path) -> None:
    # It tried the name as a Hub repository: a connection error offline, a download online.
    from templated_llm.errors import SnapshotError
    from templated_llm.runtime.loading import render_prompt

    with pytest.raises(SnapshotError, match=r"snapshot '.*nope' is not a directory"):
        render_prompt("llama2-chat", "hi", snapshot=tmp_path / "nope")


def test_build_tiny_model_builds_other_architectures_with_a_chat_template(tmp_path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text(ZEPHYR_CHAT_TEMPLATE)
    result = _cli("build-tiny-model", str(tmp_path / "m"), "--architecture", "llama",
                  "--chat-template", str(template), "--d-model", "32")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llama"
    assert "<|assistant|>" in (tmp_path / "m" / "chat_template.jinja").read_text()


@pytest.mark.parametrize("size", ["n_layers", "vocab_size", "max_seq_len"])
def test_a_tiny_model_of_zero_size_is_refused_before_anything_is_written(tmp_path, size) -> None:
    from templated_llm.devtools.tiny import build_tiny_model

    with pytest.raises(ValueError, match=f"sizes must be positive; received {{'{size}': 0}}"):
        build_tiny_model("mpt", tmp_path / "m", **{size: 0})
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(("args", "says"), [
    (["build-tiny-model", "m", "--n-heads", "3"], "n_heads must divide hidden_size"),
    (["build-tiny-model", "m", "--chat-template", "no-such.jinja"], "--chat-template 'no-such.jinja' is not a file"),
    (["log", "mpt-instruct", "--max-rows-per-request", "0"], "max_rows_per_request: Input should be greater than"),
])
def test_bad_option_values_are_one_line_errors(tmp_path, args, says) -> None:
    result = subprocess.run([sys.executable, "-m", "templated_llm.cli", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and says in result.stderr


def test_new_plugin_refuses_bad_names_and_non_empty_directories(tmp_path) -> None:
    assert "lowercase letters" in _cli("new-plugin", "Bad_Name").stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    result = _cli("new-plugin", "ok", "--directory", str(tmp_path / "taken"))
    assert result.returncode == 1 and "not empty" in result.stderr


@pytest.mark.parametrize(("name", "options", "says"), [
    ("mpt-instruct", {}, "an installed plugin already has the name 'mpt-instruct' (templated_llm_mpt)"),
    ("vicuna", {"repo_id": "bad repo id!!"}, "--repo-id 'bad repo id!!' is not a Hugging Face repo id"),
])
def test_new_plugin_refuses_an_installed_plugins_name_and_a_bad_repo_id(tmp_path, name, options, says) -> None:
    # Installed, a second 'mpt-instruct' displaced the shipped plugin with only a warning.
    with pytest.raises(TemplatedLLMError, match=re.escape(says)):
        write_plugin(name, tmp_path / name, **options)
    assert not (tmp_path / name).exists()


@pytest.mark.slow
def test_new_plugin_passes_its_own_tests_on_every_architecture_it_offers(tmp_path) -> None:
    # Llama, the default, runs in the plugin guide's end-to-end test (tests/test_docs.py).
    names = {f"kit-{a.replace('_', '')}": a for a in ARCHITECTURES if a != "llama"}
    roots = [write_plugin(name, tmp_path / name, architecture=a) for name, a in names.items()]
    site = tmp_path / "site"  # real installs, entry points and all, outside this environment
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), *map(str, roots)], check=True)
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         *(str(root / "tests") for root in roots)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])},
    )
    assert tests.returncode == 0, tests.stdout[-4000:]
    assert f"{2 * len(roots)} passed" in tests.stdout


def test_a_path_the_command_cannot_write_is_one_error_line(tmp_path) -> None:
    # A FileNotFoundError or NotADirectoryError was a traceback.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = _cli("build-tiny-model", str(blocker / "snapshot"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: Not a directory: ")
