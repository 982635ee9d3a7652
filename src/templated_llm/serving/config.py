"""What ``templated-llm serve`` is started with: the model, the address, the limits."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

#: The environment variable ``--api-key`` defaults to.
API_KEY_ENV = "TEMPLATED_LLM_API_KEY"


def check_port(port: int) -> int:
    """``port`` if a server can listen on it, else a ValueError saying what is allowed."""
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535; received {port}")
    return port


@dataclass(frozen=True)
class ServerConfig:
    model_uri: str
    host: str = "127.0.0.1"
    port: int = 5001
    #: The name clients pass as ``model``; None: the registered model's, else the plugin's model's.
    served_model_name: str | None = None
    #: Bearer token every ``/v1`` and ``/invocations`` request must carry; None: no auth.
    api_key: str | None = None
    #: Largest request body, in bytes (HTTP 413 beyond).
    max_body_bytes: int = 16 * 2**20
    #: Seconds a request may take before it is answered 504 (a stream's generation is cancelled).
    request_timeout: float = 600.0
    #: Seconds running requests get to finish after SIGTERM before they are cancelled.
    shutdown_timeout: float = 30.0
    #: Largest ``n`` (choices per prompt) a request may ask for.
    max_n: int = 8
    #: Sequences generating or waiting at once; a request beyond is answered 429.
    max_pending: int = 256

    def __post_init__(self) -> None:
        if self.api_key is None and API_KEY_ENV in os.environ:
            object.__setattr__(self, "api_key", os.environ[API_KEY_ENV])
            source = API_KEY_ENV
        else:
            source = "--api-key"
        # An empty key ("--api-key $KEY" with KEY unset) would turn auth off unnoticed, and one
        # with spaces around it never match (clients' tokens are read stripped).
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise ValueError(f"{source} is {'empty' if not self.api_key.strip() else 'padded with spaces'}; "
                             "set a key without spaces around it, or leave it unset for no auth")
        check_port(self.port)
        for name in ("max_body_bytes", "request_timeout", "shutdown_timeout", "max_n", "max_pending"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                what = "positive" if math.isfinite(value) else "a finite number"
                raise ValueError(f"{name} must be {what}; received {value}")
