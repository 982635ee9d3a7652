"""The end-to-end demo: build the small MPT, log it, load it back, and generate."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import pandas as pd

from templated_llm.devtools.tiny import build_tiny_mpt
from templated_llm.model_logging.log import log_llm

PROMPTS = ["What is machine learning?", "Name three rivers.", "Write a haiku about {{ caches }}."]


def run_demo(snapshot: Path) -> None:
    if not (snapshot / "config.json").is_file():
        print(f"building the small random MPT snapshot in {snapshot} ...")
        build_tiny_mpt(snapshot)
    print(f"tracking URI: {mlflow.get_tracking_uri()}")
    info = log_llm("mpt-instruct", snapshot=snapshot)
    print(f"logged model: {info.model_uri}")
    model = mlflow.pyfunc.load_model(info.model_uri)
    python_model = model.unwrap_python_model()
    print(f"loaded on {python_model.device} with {python_model.attention} attention")
    result = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"temperature": 0.0, "max_tokens": 24})
    for prompt, completion in zip(PROMPTS, result["candidates"], strict=True):
        print(f"\nprompt: {prompt}\ncompletion (random weights, so gibberish): {completion!r}")
    print(
        "\nserve it (OpenAI's API under /v1 and MLflow's /invocations, on one port) from this "
        f"directory with:\n  {_command()} serve {info.model_uri} --port 5001\n"
        "and ask it:\n"
        "  curl -N localhost:5001/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        "    -d '{\"model\": \"mpt-instruct\", \"stream\": true, \"max_tokens\": 16, "
        "\"messages\": [{\"role\": \"user\", \"content\": \"Name three rivers.\"}]}'\n"
        "  curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\\n"
        "    -d '{\"inputs\": {\"prompt\": [\"Name three rivers.\"]}, \"params\": {\"max_tokens\": 16}}'"
    )


def _command() -> str:
    """This environment's ``templated-llm``, runnable without activating it."""
    script = Path(sys.executable).parent / "templated-llm"
    if not script.is_file():
        return f"{sys.executable} -m templated_llm.cli"
    return str(script.relative_to(Path.cwd()) if script.is_relative_to(Path.cwd()) else script)
