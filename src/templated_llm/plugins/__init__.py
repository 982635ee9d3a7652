"""The plugin system: the hooks a model plugin implements (``hookspecs``), the manager that
finds plugins through their entry points and dispatches hooks to them (``manager``), the table
of attention backends (``attention``), and the core's own implementations of the hooks for any
Hugging Face causal LM (``hf_defaults``), which answer whatever a plugin leaves out."""
