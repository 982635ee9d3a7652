"""Benchmarks: templated-llm against the other ways to serve the same model (``python -m benchmarks``)."""
