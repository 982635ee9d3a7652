"""``log_llm``: log a plugin-provided model as a ready-to-serve MLflow pyfunc."""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from pydantic import ValidationError

from templated_llm.engine.config import EngineConfig
from templated_llm.errors import ConfigError, PluginError, validation_summary
from templated_llm.model_logging.config import (
    DEFAULT_MAX_ROWS_PER_REQUEST,
    DEFAULT_MAX_TOKENS_LIMIT,
    read_config,
)
from templated_llm.model_logging.prompt_registry import TemplateSource, fetch_prompt_template, is_prompt_uri
from templated_llm.model_logging.snapshot import check_remote_code, check_snapshot, resolve_snapshot
from templated_llm.plugins.manager import (
    get_model_spec,
    get_plugin_manager,
    main_registration_line,
    main_statement_line,
)
from templated_llm.plugins.plugin_code import code_digest, package_dir
from templated_llm.runtime.completions import output_schema
from templated_llm.runtime.device import AUTO, check_dtype, default_device
from templated_llm.runtime.inputs import PROMPT_COLUMN
from templated_llm.runtime.loading import load_tokenizer, needs_remote_code, select_attention, template_path
from templated_llm.runtime.params import GenerationParams, param_schema
from templated_llm.runtime.prompts import check_chat_template
from templated_llm.runtime.tasks import INPUT_EXAMPLES, Task, check_task, task_signature
from templated_llm.runtime.templates import validate_template
from templated_llm.spec import ModelSpec

# What the logged model needs to load and run, pinned to the versions logging ran with.
_RUNTIME_PACKAGES = (
    "mlflow", "torch", "transformers", "accelerate", "tokenizers", "safetensors",
    "huggingface_hub", "pluggy", "pydantic", "jinja2", "pandas", "llguidance",
)
# MLflow runs this file to build the model where it loads (the code travels in code_paths too).
_MODEL_CODE = Path(__file__).with_name("model_code.py")
_INPUT_EXAMPLE = ["What is machine learning?", "Name three rivers."]
# A one-file plugin module travels in a logged model under this prefix and its content's digest.
_SHIPPED_PREFIX = "templated_llm_plugin_"


@functools.cache
def _runtime_requirements() -> tuple[str, ...]:
    # Once per process: each version lookup scans the installed distributions' metadata.
    return tuple(
        f"{package}=={importlib.metadata.version(package).split('+')[0]}"  # drop labels such as +cpu
        for package in _RUNTIME_PACKAGES
    )


def _code_paths(plugin_module: str, plugin_code: Path | None, staging: Path) -> list[str]:
    paths = [package_dir(__name__)]
    if plugin_code is not None and plugin_code.is_file():
        # A one-file plugin travels under the name the model imports (a script's is new).
        plugin_code = Path(shutil.copyfile(plugin_code, staging / f"{plugin_module}.py"))
    if plugin_code is not None and plugin_code not in paths:
        paths.append(plugin_code)
    return [str(p) for p in paths]


def _plugin_code(spec: ModelSpec) -> tuple[str, Path | None]:
    """The module a loading model imports to find the plugin, and the code that provides it.

    A plugin defined in the running script travels as a module of its own: where the model
    loads, the script is imported under that name, so its top level runs and its
    ``if __name__ == "__main__":`` block does not. That must register the plugin and not log.
    """
    if spec.plugin_module != "__main__":
        code = package_dir(spec.plugin_module)
        if code is None:
            raise PluginError(
                f"plugin {spec.plugin_name!r} is defined in module {spec.plugin_module!r}, which "
                "is in no file that could travel with the model, so a server or Spark worker "
                "loading the model would not find it. Define the plugin in a module file or package."
            )
        return (_shipped_name(code), code) if code.is_file() else (spec.plugin_module, code)
    plugin = get_plugin_manager().get_plugin(spec.plugin_name)
    script = _script_defining(plugin)
    if script is None:
        raise PluginError(
            f"plugin {spec.plugin_name!r} is defined in __main__ of an interactive session "
            "(python -c, a REPL or a notebook): its code is in no file that could travel with "
            "the model, so a server or Spark worker loading the model would not find it. Move "
            "the plugin's code into a module file next to your code, say my_plugin.py, ending "
            f"with its registration: `register_plugin({_construction(plugin)}, "
            f"name={spec.plugin_name!r})`; then `import my_plugin` before log_llm. The model "
            "carries that module and imports it where it loads."
        )
    guarded = _main_block_lines(script)
    logged_from = main_statement_line()
    if logged_from is not None and logged_from not in guarded:
        raise PluginError(
            f"the script {script} calls log_llm from line {logged_from}, at its top level: the "
            "model carries the script as its plugin's module and imports it where it loads, so "
            'that line would log again there. Put it under `if __name__ == "__main__":`.'
        )
    registered_at = main_registration_line(spec.plugin_name)
    if plugin is not sys.modules["__main__"] and registered_at in guarded:
        raise PluginError(
            f"plugin {spec.plugin_name!r} is registered at line {registered_at} of {script}, "
            'under `if __name__ == "__main__":`; the model imports the script where it loads, '
            "and that block does not run there, so the plugin would be missing. Register it at "
            "the top level of the script, outside that block."
        )
    return _shipped_name(script), script


def _plugin_digest(plugin_code: Path | None) -> str | None:
    """The digest of the plugin code the model carries; None for templated-llm's own plugin,
    which is templated-llm itself (its version is recorded)."""
    if plugin_code is None or plugin_code == package_dir(__name__):
        return None
    return code_digest(plugin_code)


def _shipped_name(module_file: Path) -> str:
    """The name a one-file plugin module travels under: from its content, so that where models
    load, two models' modules of one name (two notebooks' my_plugin.py) are two modules."""
    return _SHIPPED_PREFIX + code_digest(module_file)[:12]  # the digest the model records, shortened


def _script_defining(plugin: object) -> Path | None:
    """The file of the running script, if the plugin's hook functions are its code."""
    file = getattr(sys.modules["__main__"], "__file__", None)
    if not file or not file.endswith(".py"):
        return None
    script = Path(file).resolve()
    functions = [impl.function for caller in get_plugin_manager().get_hookcallers(plugin) or []
                 for impl in caller.get_hookimpls() if impl.plugin is plugin]
    files = {Path(function.__code__.co_filename).resolve() for function in functions}
    return script if files == {script} else None


def _main_block_lines(script: Path) -> set[int]:
    """Lines of the script's ``if __name__ == "__main__":`` blocks (their ``else`` excluded)."""
    lines: set[int] = set()
    for node in ast.parse(script.read_bytes()).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "__name__ == '__main__'", "'__main__' == __name__"
        ):
            lines.update(range(node.body[0].lineno, node.body[-1].end_lineno + 1))
    return lines


def _construction(plugin: object) -> str:
    if isinstance(plugin, type):
        return plugin.__name__
    return f"{type(plugin).__name__}()"


class _ExampleNotRunModel(Model):
    """MLflow's Model, minus the input-example check at log time.

    ``mlflow.pyfunc.log_model`` is ``Model.log(flavor=mlflow.pyfunc, ...)``; after saving, it
    loads the model and predicts the input example, which would load the full weights. The
    example is still saved with the model; only that log-time run is skipped.
    """

    def get_serving_input(self, path: str) -> str | None:
        return None


def _signature(task: Task | None, defaults: dict[str, Any], template_variables: dict[str, str]) -> ModelSignature:
    params = param_schema(defaults, template_variables)
    if task is not None:
        return task_signature(task, params)
    return ModelSignature(
        # No input schema: MLflow accepts either a plain list of prompts (unnamed schema) or
        # a 'prompt' column (named schema), never both; predict checks the input itself.
        inputs=None,
        outputs=output_schema(),
        params=params,
    )


def _template_source(spec: ModelSpec, template: str | os.PathLike[str] | None, staging: Path) -> TemplateSource:
    """The template file to log: a file (the plugin's when ``template`` is None), versioned by
    the start of its SHA-256, or a prompt registry version's text, written under ``staging``."""
    if is_prompt_uri(template):
        staging.mkdir()
        return fetch_prompt_template(template, staging)
    path = template_path(spec, template)
    return TemplateSource(path, path.name, "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:12])


def _as_artifact(path: Path, staging: Path) -> str:
    """``path`` where MLflow can log it from: MLflow reads an artifact's path as a URI, where
    '#' ends it and '%41' is an 'A', so a path with other characters goes as a plain copy."""
    if re.fullmatch(r"[\w./-]+", str(path), re.ASCII):
        return str(path)
    plain = "template" + "".join(c for c in path.suffix if c.isalnum() or c == ".")
    return str(shutil.copyfile(path, staging / plain))


def _check_snapshot(spec: ModelSpec, snapshot: Path, trust_remote_code: bool) -> None:
    """Files first (naming the broken one), then remote code, then the tokenizer really loads
    (with a chat template, if the model renders with it)."""
    check_snapshot(snapshot, spec)
    check_remote_code(needs_remote_code(spec, snapshot), trust_remote_code)
    check_chat_template(spec, load_tokenizer(spec, snapshot, trust_remote_code), snapshot)


def log_llm(
    model: str,
    snapshot: str | os.PathLike[str] | None = None,
    *,
    name: str = "model",
    template: str | os.PathLike[str] | None = None,
    attention: str = "auto",
    dtype: str = AUTO,
    registered_model_name: str | None = None,
    extra_pip_requirements: list[str] | None = None,
    trust_remote_code: bool = False,
    max_rows_per_request: int = DEFAULT_MAX_ROWS_PER_REQUEST,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
    pack_weights: bool = True,
    engine: bool | EngineConfig = True,
    task: Task | None = None,
    tracing: bool = True,
    trace_content: bool = True,
    **kwargs: Any,
) -> ModelInfo:
    """Log ``model`` (a name a plugin serves, e.g. ``"mpt-instruct"``) as an MLflow pyfunc.

    Args:
        model: the model name; ``templated-llm plugins`` lists the installed ones.
        snapshot: a local snapshot directory, used as is; ``None`` downloads the plugin's
            Hugging Face repository.
        name: the logged model's name.
        template: a Jinja template replacing the plugin's: a file, a shipped template's name,
            or a version in MLflow's prompt registry (``prompts:/name/3``,
            ``prompts:/name@alias``), whose text is copied into the model and whose version
            is linked to it.
        attention: ``auto``, ``eager``, ``sdpa``, ``triton`` or ``flash``.
        dtype: ``auto`` (the checkpoint's dtype where the device computes it natively, else
            float32; chosen at load, and logged), ``float32``, ``bfloat16`` or ``float16``.
        registered_model_name: also register a version under this name in the Model Registry.
        extra_pip_requirements: requirements added to the pinned defaults.
        trust_remote_code: allow loading to run Python code shipped in the snapshot (an
            ``auto_map`` in its config); off by default, recorded in the logged model, and
            warned about on every load.
        max_rows_per_request: most prompts one ``predict`` call (one request) may carry.
        max_tokens_limit: the largest ``max_tokens`` a caller may ask for; below the
            plugin's default ``max_tokens``, that default is lowered to it.
        pack_weights: on CPU, reorder the linear layers' weights once at load into oneDNN's
            layout (about 2x faster matmuls; same arithmetic, rounding may differ in the
            last bits), or, for bfloat16 weights larger than the CPU's cache, run them
            weight-major. ``False`` keeps ``nn.Linear``.
        engine: serve through the continuous-batching engine (``True``, budget sized at load),
            with an ``EngineConfig`` budget, or ``False`` to generate whole batches with
            transformers' ``generate``. Overridable at load through ``model_config``.
        task: ``"llm/v1/chat"`` or ``"llm/v1/completions"`` logs MLflow's own signature for
            that task and sets ``metadata.task``: the served model takes OpenAI-shaped bodies
            and answers each with one ``chat.completion`` (or ``text_completion``) object.
            ``None`` keeps the ``prompt``/``candidates`` schema.
        tracing: trace every request with MLflow tracing (when MLflow's tracing is enabled);
            ``TEMPLATED_LLM_TRACING`` overrides it where the model is loaded.
        trace_content: keep prompt and completion text in those traces; ``False`` records
            counts only. ``TEMPLATED_LLM_TRACE_CONTENT`` overrides it where the model is loaded.
        **kwargs: passed on to ``mlflow.pyfunc.log_model`` (``tags``, ``metadata``, ...); one
            it does not take is refused before anything is logged.

    The weights are not loaded here, and they are copied once, into the artifact store.
    The template, the snapshot's files and its need for remote code are checked first: a
    failing check raises before anything is written to the store.
    """
    _check_mlflow_arguments(kwargs)
    _check_registered_name(registered_model_name)
    spec = get_model_spec(model)
    plugin_module, plugin_code = _plugin_code(spec)
    # A dtype that cannot run here fails now, as an attention backend does.
    check_dtype(dtype, default_device())
    check_task(task, spec.chat, spec.name)
    # An explicit backend that cannot run here fails now rather than at serving time.
    select_attention(spec, attention, default_device(), Path(snapshot) if snapshot is not None else None)
    with tempfile.TemporaryDirectory() as staging:
        source = _template_source(spec, template, Path(staging) / "template")
        # Fail before logging: sandbox checks, and one render with the spec's template variables.
        # A registry prompt is named by its URI, not the staging file it was written to.
        validate_template(source.path, {"prompt": _INPUT_EXAMPLE[0], **spec.template_variables}, source.uri)
        config = read_config(dict(
            model=spec.name,
            plugin=spec.plugin_name,
            plugin_module=plugin_module,
            plugin_digest=_plugin_digest(plugin_code),
            attention=attention,
            dtype=dtype,
            generation_defaults=_generation_defaults(spec),
            templated_llm_version=importlib.metadata.version("templated-llm"),
            trust_remote_code=trust_remote_code,
            max_rows_per_request=max_rows_per_request,
            max_tokens_limit=max_tokens_limit,
            pack_weights=pack_weights,
            **_engine_fields(engine),
            task=task,
            tracing=tracing,
            trace_content=trace_content,
            template_name=source.name,
            template_version=source.version,
            template_uri=source.uri,
        ), "log_llm")
        snapshot_dir = resolve_snapshot(spec, snapshot)
        _check_snapshot(spec, snapshot_dir, trust_remote_code)
        # Here, not at the top: a plugin script imports this module where its model loads,
        # which may have the core only as the model's code, without this installed package.
        from templated_llm_link import staging_uri

        requirements = list(_runtime_requirements())
        requirements += [*spec.pip_requirements, *(extra_pip_requirements or [])]
        if task is not None:
            kwargs["metadata"] = {**(kwargs.get("metadata") or {}), "task": task}
        if source.uri is not None:
            # MLflow links the prompt version to the logged model (and its run).
            kwargs["prompts"] = [*(kwargs.get("prompts") or []), source.uri]
        return _ExampleNotRunModel.log(
            artifact_path=None,
            flavor=mlflow.pyfunc,
            flavor_name="pyfunc",
            name=name,
            python_model=str(_MODEL_CODE),
            # The template's text travels in the model: serving needs no prompt registry.
            artifacts={"snapshot": staging_uri(snapshot_dir),
                       "template": _as_artifact(source.path, Path(staging))},
            model_config=config.model_dump(),
            signature=_signature(task, config.generation_defaults, spec.template_variables),
            input_example=INPUT_EXAMPLES[task] if task else pd.DataFrame({PROMPT_COLUMN: _INPUT_EXAMPLE}),
            pip_requirements=requirements,
            code_paths=_code_paths(plugin_module, plugin_code, Path(staging)),
            registered_model_name=registered_model_name,
            **kwargs,
        )


# What log_llm sets itself in MLflow's log_model call.
_SET_BY_LOG_LLM = {"artifact_path", "name", "python_model", "artifacts", "model_config", "signature",
                   "input_example", "pip_requirements", "code_paths", "registered_model_name"}


def _check_mlflow_arguments(kwargs: dict[str, Any]) -> None:
    """Refuse, before anything is logged, keyword arguments MLflow's ``log_model`` would reject
    only after creating the logged model (or that log_llm sets itself)."""
    accepted = set(inspect.signature(mlflow.pyfunc.log_model).parameters) - _SET_BY_LOG_LLM
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(f"log_llm() got unexpected keyword arguments {unknown}; besides its own, it "
                        f"takes those of mlflow.pyfunc.log_model: {sorted(accepted)}")


def _engine_fields(engine: bool | EngineConfig) -> dict[str, Any]:
    if isinstance(engine, EngineConfig):
        return {"engine": True, **dataclasses.asdict(engine)}
    return {"engine": engine}  # validated as the other switches are ("no" is False)


def _generation_defaults(spec: ModelSpec) -> dict[str, Any]:
    try:
        return GenerationParams(**spec.generation_defaults).model_dump()
    except ValidationError as exc:
        raise PluginError(f"plugin {spec.plugin_name!r} gives model {spec.name!r} generation_defaults "
                          f"that are not valid params: {validation_summary(exc)}") from exc


def _check_registered_name(name: str | None) -> None:
    """The Model Registry's own check of a name, before anything is logged (MLflow makes it only
    after the model and its weights are written)."""
    if name is None:
        return
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise ConfigError(f"log_llm: registered_model_name {name!r} is not a registry name: {exc.message}") from exc
