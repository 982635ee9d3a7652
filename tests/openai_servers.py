"""Starting ``templated-llm serve`` for a test module, and reading what it serves."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator

import psutil
import requests

from local_server import free_port, running_server


@contextlib.contextmanager
def openai_server(model_uri: str, *options: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """``templated-llm serve model_uri *options`` on a free port; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "templated_llm.cli", "serve", model_uri, "--port", str(port), *options]
    with running_server(command, port, env=env) as url:
        yield url


def metric(url: str, name: str) -> float:
    """The value of one sample of the server's /metrics, 0 when it has none yet."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def server_process(port: int) -> psutil.Process:
    """The server process this test process started on ``port``."""
    [process] = [p for p in psutil.Process(os.getpid()).children() if str(port) in p.cmdline()]
    return process
