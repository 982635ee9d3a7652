"""A plugin registered in code from ``__main__`` (a script, ``python -c``, a notebook): the model
either carries it and loads in a fresh server, or log_llm refuses, saying exactly what to do."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests

from local_server import free_port, running_server

pytestmark = pytest.mark.slow

PLUGIN = '''
from templated_llm import ModelSpec, hookimpl, register_plugin


class NotebookPlugin:
    @hookimpl
    def register_models(self, register):
        register(ModelSpec(name="notebook-model", repo_id="example/notebook",
                           template="mpt-instruct.jinja", generation_defaults={"max_tokens": 3}))
'''
REGISTER = 'register_plugin(NotebookPlugin(), name="notebook")\n'
LOG = 'info = log_llm("notebook-model", snapshot=sys.argv[-1], name="from-main")\nprint("URI", info.model_uri)\n'
IMPORTS = "import sys\nfrom templated_llm import log_llm\n"


def _python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env=os.environ, timeout=300)  # the code under test


def _logged_uri(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-4000:]
    return next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("URI "))


def _served_candidates(model_uri: str, cwd: Path) -> list[str]:
    """Serve ``model_uri`` from a fresh process started in an empty directory; predict twice."""
    port = free_port()
    command = [sys.executable, "-m", "templated_llm.cli", "serve", model_uri, "--port", str(port)]
    with running_server(command, port, cwd=str(cwd)) as url:
        response = requests.post(f"{url}/invocations", timeout=120,
                                 data=json.dumps({"inputs": ["hi", "there"],
                                                  "params": {"temperature": 0.0}}),
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    return [row["candidates"] for row in response.json()["predictions"]]


def _elsewhere(tmp_path: Path) -> Path:
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    return empty


def test_a_plugin_in_a_script_travels_with_the_model(tiny_snapshot, tmp_path):
    script = tmp_path / "log_my_model.py"
    script.write_text(IMPORTS + PLUGIN + REGISTER + 'if __name__ == "__main__":\n'
                      + textwrap.indent(LOG, "    "))
    uri = _logged_uri(_python([str(script), str(tiny_snapshot)], cwd=tmp_path))
    elsewhere = _elsewhere(tmp_path)
    assert len(_served_candidates(uri, elsewhere)) == 2
    # Where the core is only the model's own code: the script's imports need no installed package.
    load = ("import sys; sys.modules['templated_llm_link'] = None  # not installed here\n"
            f"import mlflow; print(len(mlflow.pyfunc.load_model({uri!r}).predict(['hi'])))")
    result = _python(["-c", load], cwd=elsewhere)
    assert result.returncode == 0 and result.stdout.strip().endswith("1"), result.stderr[-3000:]


@pytest.mark.parametrize(("script", "expected"), [
    (IMPORTS + PLUGIN + REGISTER + LOG,
     r"calls log_llm from line 13, at its top level.*if __name__ == \"__main__\":"),
    (IMPORTS + PLUGIN + 'if __name__ == "__main__":\n' + textwrap.indent(REGISTER + LOG, "    "),
     r"registered at line 13 of .*, under `if __name__ == \"__main__\":`.*at the top level"),
], ids=["log_llm unguarded", "registration guarded"])
def test_a_script_that_could_not_load_elsewhere_is_refused(tiny_snapshot, tmp_path, script, expected):
    path = tmp_path / "log_my_model.py"
    path.write_text(script)
    result = _python([str(path), str(tiny_snapshot)], cwd=tmp_path)
    assert result.returncode != 0
    assert "PluginError" in result.stderr
    assert re.search(expected, result.stderr.replace("\n", " ")), result.stderr[-3000:]


def test_a_plugin_defined_interactively_is_refused_with_what_to_do(tiny_snapshot, tmp_path):
    result = _python(["-c", IMPORTS + PLUGIN + REGISTER + LOG, str(tiny_snapshot)], cwd=tmp_path)
    assert result.returncode != 0
    message = result.stderr.replace("\n", " ")
    assert "plugin 'notebook' is defined in __main__ of an interactive session" in message
    assert "register_plugin(NotebookPlugin(), name='notebook')" in message
    assert "URI " not in result.stdout


def test_doing_what_the_refusal_says_serves_from_an_interactive_session(tiny_snapshot, tmp_path):
    # The refusal's advice: the plugin in a module file that registers it, imported before logging.
    (tmp_path / "my_plugin.py").write_text(PLUGIN + REGISTER)
    code = "import my_plugin\n" + IMPORTS + LOG
    uri = _logged_uri(_python(["-c", code, str(tiny_snapshot)], cwd=tmp_path))
    assert len(_served_candidates(uri, _elsewhere(tmp_path))) == 2


def _loaded_in_one_process(uris: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Load ``uris`` in order in one fresh process, printing each one's rendering of 'hi'."""
    load = ("import json, mlflow\n"
            f"for uri in {uris!r}:\n"
            "    print(json.dumps(mlflow.pyfunc.load_model(uri).unwrap_python_model().render(['hi'])))")
    return _python(["-c", load], cwd=cwd)


MPT_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
              "completes the request.\n### Instruction:\n{prompt}\n### Response:\n")


def test_a_plugin_in_a_namespace_package_travels_with_the_model(tiny_snapshot, tmp_path):
    package = tmp_path / "acme_plugins"  # no __init__.py: a namespace package
    package.mkdir()
    (package / "notebook.py").write_text(PLUGIN + REGISTER)
    code = "import acme_plugins.notebook\n" + IMPORTS + LOG
    uri = _logged_uri(_python(["-c", code, str(tiny_snapshot)], cwd=tmp_path))
    loaded = _loaded_in_one_process([uri], _elsewhere(tmp_path))
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.splitlines()[-1]) == [MPT_PROMPT.format(prompt="hi")]


# One module name, one class name, one plugin name: the code differs in its model's description.
OWN_PLUGIN = '''
from pathlib import Path

from templated_llm import ModelSpec, hookimpl, register_plugin


class NotebookPlugin:
    @hookimpl
    def register_models(self, register):
        register(ModelSpec(name={model!r}, repo_id="example/notebook", description={folder!r},
                           template=str(Path(__file__).with_name("own.jinja"))))


register_plugin(NotebookPlugin(), name="notebook")
'''


def _logged_with_own_plugin(tmp_path: Path, folder: str, model: str, snapshot: Path,
                            package: bool = False) -> str:
    """A model logged from ``folder``, by its own ``my_plugin`` rendering '<folder>: prompt':
    a module file, or with ``package`` a package directory."""
    where = tmp_path / folder
    code = where / "my_plugin" if package else where
    code.mkdir(parents=True)
    (code / "own.jinja").write_text(folder + ": {{ prompt }}")
    (code / ("__init__.py" if package else "my_plugin.py")).write_text(OWN_PLUGIN.format(model=model, folder=folder))
    log = f'info = log_llm({model!r}, snapshot=sys.argv[-1], name={folder!r})\nprint("URI", info.model_uri)\n'
    return _logged_uri(_python(["-c", "import my_plugin\n" + IMPORTS + log, str(snapshot)], cwd=where))


def test_models_whose_plugins_share_module_and_plugin_names_load_side_by_side(tiny_snapshot, tmp_path):
    first = _logged_with_own_plugin(tmp_path, "first", "first-model", tiny_snapshot)
    second = _logged_with_own_plugin(tmp_path, "second", "second-model", tiny_snapshot)
    loaded = _loaded_in_one_process([first, second, first], _elsewhere(tmp_path))
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert [json.loads(line) for line in loaded.stdout.splitlines()[-3:]] == [
        ["first: hi"], ["second: hi"], ["first: hi"]]


def test_a_model_name_served_by_another_models_plugin_code_is_refused(tiny_snapshot, tmp_path):
    first = _logged_with_own_plugin(tmp_path, "first", "same-model", tiny_snapshot)
    second = _logged_with_own_plugin(tmp_path, "second", "same-model", tiny_snapshot)
    loaded = _loaded_in_one_process([first, second], _elsewhere(tmp_path))
    assert loaded.returncode != 0
    message = loaded.stderr.replace("\n", " ")
    assert "PluginError: model 'same-model' is served in this process by the plugin code another " \
           "logged model carried" in message, loaded.stderr[-3000:]


def test_a_plugin_package_of_the_name_another_loaded_model_carried_is_told_apart(tiny_snapshot, tmp_path):
    # Python imports my_plugin once per process: the second model would render with the first's.
    first = _logged_with_own_plugin(tmp_path, "first", "same-model", tiny_snapshot, package=True)
    second = _logged_with_own_plugin(tmp_path, "second", "same-model", tiny_snapshot, package=True)
    loaded = _loaded_in_one_process([first, first, second], _elsewhere(tmp_path))
    assert loaded.returncode != 0
    assert [json.loads(line) for line in loaded.stdout.splitlines()[-2:]] == [["first: hi"], ["first: hi"]]
    message = loaded.stderr.replace("\n", " ")
    assert "PluginError: model 'same-model' carries its plugin code as 'my_plugin', but this process " \
           "has already imported a different 'my_plugin'" in message, loaded.stderr[-3000:]
