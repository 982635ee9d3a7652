"""A logged model behind a real server, reached through the Model Registry: ``templated-llm
serve`` (MLflow's scoring routes beside the OpenAI ones) and ``--mlflow-only`` (plain ``mlflow
models serve``) answer every request format, and every bad request, alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow import MlflowClient

from local_server import free_port, running_server
from templated_llm import log_llm
from templated_llm.cli import serve_command

pytestmark = pytest.mark.slow

PROMPTS = ["Name three rivers.", "What is machine learning?", "Hi"]
GREEDY = {"temperature": 0.0, "max_tokens": 6}
REGISTERED = "tiny-mpt-instruct"


@pytest.fixture(scope="module")
def registered(tiny_snapshot):
    info = log_llm("mpt-instruct", snapshot=tiny_snapshot, name="served",
                   registered_model_name=REGISTERED)
    assert info.registered_model_version == 1
    MlflowClient().set_registered_model_alias(REGISTERED, "champion", "1")
    return info


@pytest.fixture(scope="module")
def expected(registered):
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/1")
    return model.predict(PROMPTS, params=GREEDY)["candidates"].tolist()


@pytest.fixture(scope="module", params=[[], ["--mlflow-only"]], ids=["templated-llm-serve", "mlflow-only"])
def server(request, registered):
    port = free_port()
    command = [sys.executable, "-m", "templated_llm.cli", "serve", f"models:/{REGISTERED}@champion",
               "--port", str(port), *request.param]
    with running_server(command, port) as url:
        yield url


def _post(url: str, body: object) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{url}/invocations", data=data,
                         headers={"Content-Type": "application/json"}, timeout=120)


def _candidates(response: requests.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [row["candidates"] for row in response.json()["predictions"]]


def test_the_alias_and_the_version_load_in_process(registered, expected):
    by_alias = mlflow.pyfunc.load_model(f"models:/{REGISTERED}@champion")
    assert by_alias.predict(PROMPTS, params=GREEDY)["candidates"].tolist() == expected


BODIES = {
    "dataframe_split": {"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in PROMPTS]}},
    "dataframe_records": {"dataframe_records": [{"prompt": p} for p in PROMPTS]},
    "inputs list": {"inputs": PROMPTS},
    "inputs dict": {"inputs": {"prompt": PROMPTS}},
}


@pytest.mark.parametrize("with_params", [True, False], ids=["params", "no-params"])
@pytest.mark.parametrize("form", BODIES)
def test_every_request_format_gets_one_candidate_per_prompt(server, expected, form, with_params):
    body = dict(BODIES[form])
    if with_params:
        body["params"] = GREEDY
    candidates = _candidates(_post(server, body))
    assert len(candidates) == len(PROMPTS) and all(isinstance(c, str) for c in candidates)
    if with_params:
        assert candidates == expected


# Each case's request and words its 400's message must hold (MLflow echoes the input before our
# message, so the words are ones only the message itself says).
BAD_REQUESTS = {
    "missing prompt column": ({"dataframe_split": {"columns": ["text"], "data": [["hi"]]}},
                              "must have a 'prompt' column"),
    "null prompt": ({"dataframe_records": [{"prompt": None}]}, "must be a string; received null"),
    "non-string prompt": ({"inputs": {"prompt": [["nested"]]}}, "must be a string; received array"),
    "empty list": ({"inputs": []}, "has no prompts"),
    "temperature below 0": ({"inputs": ["hi"], "params": {"temperature": -0.5}}, "param 'temperature'"),
    "max_tokens of 0": ({"inputs": ["hi"], "params": {"max_tokens": 0}}, "param 'max_tokens'"),
    "max_tokens above its limit": ({"inputs": ["hi"], "params": {"max_tokens": 4096}},
                                   "at most 1024 for this model (max_tokens_limit"),
    "prompt longer than the context": ({"inputs": ["word " * 3000], "params": GREEDY},
                                       "fills the model's context of 2048 tokens"),
    "prompt plus max_tokens over the context": ({"inputs": ["word " * 1900], "params": {"max_tokens": 300}},
                                                "with max_tokens=300 that exceeds the model's context"),
    "wrong param type": ({"inputs": ["hi"], "params": {"max_tokens": "many"}},
                         "validate type and shape for 'max_tokens'"),
    "malformed JSON": ('{"inputs": ["hi"', "valid JSON"),
    "a column that is not a param": ({"dataframe_records": [{"prompt": "hi", "temprature": 0.5}]},
                                     "input columns ['temprature'] are neither 'prompt'"),
    "a row's bad param": ({"dataframe_records": [{"prompt": "hi"}, {"prompt": "hi", "max_tokens": 0}]},
                          "request 1 (of 2 in the frame): param 'max_tokens'"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_are_400_and_the_server_keeps_serving(server, case):
    body, words = BAD_REQUESTS[case]
    response = _post(server, body)
    assert response.status_code == 400, response.text
    assert words in response.json()["message"]
    assert len(_candidates(_post(server, {"inputs": ["hi"], "params": GREEDY}))) == 1


def test_each_dataframe_row_generates_with_the_params_in_its_columns(server, registered):
    # Columns named as params set that row's params (over the request's): what Spark's struct
    # columns and dataframe_records carry.
    records = [{"prompt": PROMPTS[0], "max_tokens": 2}, {"prompt": PROMPTS[1]},
               {"prompt": PROMPTS[2], "max_tokens": 9, "temperature": 0.0}]
    model = mlflow.pyfunc.load_model(registered.model_uri)
    alone = [model.predict([r["prompt"]], params={**GREEDY, **r})["candidates"][0] for r in records]
    assert len(set(alone)) == 3
    body = {"dataframe_records": records, "params": GREEDY}
    assert _candidates(_post(server, body)) == alone


def test_16_concurrent_requests_all_succeed_with_greedy_results(server, expected):
    body = {"inputs": {"prompt": PROMPTS}, "params": GREEDY}
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: _candidates(_post(server, body)), range(16)))
    assert results == [expected] * 16


def test_the_serve_command_is_mlflows():
    command = serve_command("models:/m@a", host="127.0.0.1", port=1, workers=2, env_manager="local")
    assert command[1:] == ["-m", "mlflow", "models", "serve", "-m", "models:/m@a",
                           "--env-manager", "local", "-h", "127.0.0.1", "-p", "1", "-w", "2"]


@pytest.fixture(scope="module")
def python_without_templated_llm(tmp_path_factory) -> Path:
    """A virtualenv seeing every installed package except templated-llm and its plugin."""
    root = tmp_path_factory.mktemp("bare-env")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    installed = Path(sysconfig.get_paths()["purelib"])
    shown = root / "site"
    shown.mkdir()
    for entry in installed.iterdir():
        if not entry.name.startswith(("templated_llm", "_editable_impl_templated_llm")):
            (shown / entry.name).symlink_to(entry)
    site_packages = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    (site_packages / "installed.pth").write_text(f"{shown}\n")
    # `mlflow models serve` starts `uvicorn` from PATH; make it this interpreter's.
    uvicorn = python.parent / "uvicorn"
    uvicorn.write_text(f"#!{python}\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    uvicorn.chmod(0o755)
    return python


def test_the_logged_model_serves_where_templated_llm_is_not_installed(
    python_without_templated_llm, registered, expected
):
    python = python_without_templated_llm
    for module in ("templated_llm", "templated_llm_mpt"):
        probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True,
                               cwd="/", text=True, env={**os.environ, "PYTHONPATH": ""})
        assert "ModuleNotFoundError" in probe.stderr
    port = free_port()
    command = [str(python), "-m", "mlflow", "models", "serve", "-m", f"models:/{REGISTERED}/1",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = {"PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": ""}
    with running_server(command, port, env=env, cwd="/") as url:
        body = {"inputs": {"prompt": PROMPTS}, "params": GREEDY}
        assert _candidates(_post(url, body)) == expected
