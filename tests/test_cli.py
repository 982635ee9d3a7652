"""The templated-llm command line calls the Python API and reports errors without traces."""

from __future__ import annotations

import subprocess
import sys

import pytest

from templated_llm.cli import _parser


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "templated_llm.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_plugins_lists_plugins_and_their_models() -> None:
    result = _cli("plugins")
    assert result.returncode == 0, result.stderr
    assert "mpt-instruct: mpt-instruct" in result.stdout


def test_log_prints_the_model_uri_and_the_serve_command(tiny_snapshot) -> None:
    result = _cli("log", "mpt-instruct", "--snapshot", str(tiny_snapshot), "--attention", "eager")
    assert result.returncode == 0, result.stderr
    uri, serve = result.stdout.strip().splitlines()[-2:]
    assert uri.startswith("models:/m-")
    assert f"mlflow models serve -m {uri}" in serve


def test_errors_are_one_line_and_exit_1(tiny_snapshot) -> None:
    result = _cli("log", "no-such-model", "--snapshot", str(tiny_snapshot))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: no installed templated-llm plugin")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["build-tiny-model", "plugins", "log", "serve", "demo"])
def test_every_option_has_help(command: str) -> None:
    subparsers = next(a for a in _parser()._actions if a.dest == "command")
    for action in subparsers.choices[command]._actions:
        assert action.help, f"{command} {action.dest} has no help"
