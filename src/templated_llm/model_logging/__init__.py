"""Logging a model: ``log_llm`` (``log``) finds and checks the snapshot (``snapshot``), checks the
template and attention backend, and logs an MLflow pyfunc whose code is ``model_code`` and whose
``model_config`` is a ``LoggedConfig`` (``config``); nothing here loads the weights."""
