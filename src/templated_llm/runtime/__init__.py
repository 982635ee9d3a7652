"""The loaded model's pipeline, one stage per module: a request's ``inputs`` and ``params`` are
validated, each row is rendered to a prompt (``prompts``, through the sandboxed ``templates``),
tokenized within the model's context (``tokens``), generated (``generation``, batched across
requests by ``batching``) and turned into ``completions``. ``pyfunc.TemplatedLLM`` composes the
stages; ``loading`` builds what they run on through the plugin hooks, with ``device`` and
``packed_linear``."""
