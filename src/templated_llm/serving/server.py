"""Runs the server: uvicorn on one port, graceful shutdown on SIGTERM, exit 0."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import uvicorn

from templated_llm.errors import user_message
from templated_llm.serving.allocator import keep_freed_memory
from templated_llm.serving.app import ServerState, create_app
from templated_llm.serving.config import ServerConfig

_logger = logging.getLogger("templated_llm.serving")


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when a shutdown starts: it then takes no more requests
    and cancels, after the shutdown timeout, the ones still running."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            self._state.request_drain()
        super().handle_exit(sig, frame)


def serve(config: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT; the exit status: 0, or 1 when the model failed to load."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    _logger.info(keep_freed_memory())  # before the model loads: its allocations are served so too
    server: _Server | None = None

    def stop() -> None:
        server.should_exit = True

    state = ServerState(config, on_load_failure=stop)
    server = _Server(uvicorn.Config(
        create_app(state), host=config.host, port=config.port, access_log=False, log_config=None,
        # The app cancels what still runs at shutdown_timeout; uvicorn waits a little longer.
        timeout_graceful_shutdown=int(config.shutdown_timeout) + 5,
    ), state)
    # After a graceful shutdown uvicorn raises the signal again for the handler it found: make
    # that one do nothing, so that SIGTERM (or Ctrl-C) ends the process with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda sig, frame: None)
    server.run()
    if state.load_error is None:
        return 0
    # The last line, after uvicorn's: what went wrong, as the command line's other errors say it.
    message = user_message(state.load_error) or f"{type(state.load_error).__name__}: {state.load_error}"
    print(f"error: loading {config.model_uri} failed: {message}", file=sys.stderr)
    return 1
