"""The tests' server helpers, from :mod:`templated_llm.local_server` (shared with the benchmarks)."""

from templated_llm.local_server import free_port, running_server

__all__ = ["free_port", "running_server"]
