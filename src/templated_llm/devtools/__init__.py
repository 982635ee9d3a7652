"""Tools for developing with templated-llm rather than serving with it: small random model
snapshots for tests and demos (``tiny``), the ``templated-llm new-plugin`` scaffold with its
file templates (``scaffold``, ``plugin_kit/``), and the end-to-end ``demo``."""
