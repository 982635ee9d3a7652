"""``templated-llm serve``: an OpenAI-compatible, streaming HTTP server for a logged TemplatedLLM,
with MLflow's scoring routes on the same port. See docs/serving.md."""

from templated_llm.serving.config import API_KEY_ENV, ServerConfig
from templated_llm.serving.server import serve

__all__ = ["API_KEY_ENV", "ServerConfig", "serve"]
