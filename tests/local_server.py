"""Runs a real model server (``templated-llm serve``, ``mlflow models serve``, ...) on 127.0.0.1
for as long as a block lasts.

Used by the tests and the benchmarks, which both need a server process they start and stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(command: Sequence[str], port: int, env: dict[str, str] | None = None,
                   cwd: str | None = None, timeout: float = 180,
                   ready_path: str = "/ping") -> Iterator[str]:
    """Run ``command`` (which must serve on ``port``), wait until ``ready_path`` answers 200,
    yield the base URL."""
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})}, cwd=cwd,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"server did not come up:\n{log.read()[-6000:]}")
                with contextlib.suppress(requests.ConnectionError):
                    if requests.get(f"{url}{ready_path}", timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
