"""The ``templated-llm`` command line; each command calls the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

# Read once, when torch loads OpenMP, so set before anything imports torch. By default OpenMP's
# workers spin for a while after each parallel region; a served model runs on its engine's
# thread beside the server's own threads (HTTP, tokenizing), and spinning workers starved them:
# 3-5x slower generation whenever another process or thread wanted a core. Sleeping workers cost
# 10-25% on an otherwise idle machine (docs/serving.md). A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from templated_llm.devtools.tiny import ARCHITECTURES  # noqa: E402 - after the OpenMP setting
from templated_llm.model_logging.config import DType
from templated_llm.serving.allocator import malloc_environment
from templated_llm.serving.config import API_KEY_ENV, ServerConfig, check_port


def _build_tiny_model(args: argparse.Namespace) -> None:
    from templated_llm.devtools.tiny import build_tiny_model

    if args.chat_template is not None and not args.chat_template.is_file():
        raise argparse.ArgumentTypeError(f"--chat-template {str(args.chat_template)!r} is not a file")
    try:
        path = build_tiny_model(
            args.architecture, args.path, seed=args.seed, hidden_size=args.d_model,
            n_layers=args.n_layers, n_heads=args.n_heads, vocab_size=args.vocab_size,
            max_seq_len=args.max_seq_len,
            chat_template=args.chat_template.read_text() if args.chat_template else None,
        )
    except ValueError as exc:  # sizes that make no model
        raise argparse.ArgumentTypeError(str(exc)) from None
    print(path)


def _new_plugin(args: argparse.Namespace) -> None:
    from templated_llm.devtools.scaffold import write_plugin

    path = write_plugin(args.name, args.directory, repo_id=args.repo_id, architecture=args.architecture)
    print(path)
    print(f"next: pip install -e '{path}[test]' && pytest {path / 'tests'}")


def _variables(pairs: list[str]) -> dict[str, str]:
    variables = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals:
            raise argparse.ArgumentTypeError(f"--var takes NAME=VALUE; received {pair!r}")
        variables[name] = value
    return variables


def _render(args: argparse.Namespace) -> None:
    import json

    from templated_llm.runtime.inputs import to_conversations
    from templated_llm.runtime.loading import render_prompt

    if (args.prompt is None) == (args.messages is None):
        raise argparse.ArgumentTypeError("pass either --prompt or --messages")
    row = args.prompt
    if args.messages is not None:
        try:
            messages = json.loads(args.messages)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"--messages is not JSON: {exc}") from None
        [row] = to_conversations({"messages": [messages]})
    variables = _variables(args.var)
    if args.system is not None:
        variables["system"] = args.system
    # end="": the prompt is printed exactly, a trailing newline only if the prompt has one.
    print(render_prompt(args.model, row, variables=variables, template=args.template,
                        snapshot=args.snapshot), end="")


def _plugin_records() -> list[dict[str, Any]]:
    from templated_llm.plugins.manager import plugin_info, plugin_load_errors

    records = [{
        "name": info.name, "distribution": info.distribution, "version": info.version,
        "models": [{"name": s.name, "repo_id": s.repo_id, "revision": s.revision,
                    "template": s.template, "description": s.description} for s in info.models],
        "hooks": info.hooks, "error": None,
    } for info in plugin_info()]
    records += [{"name": e.name, "distribution": None, "version": None, "models": [], "hooks": [],
                 "error": f"{e.entry_point}: {e.error}"} for e in plugin_load_errors()]
    return records


def _plugins(args: argparse.Namespace) -> None:
    import json

    records = _plugin_records()
    if args.json:
        print(json.dumps(records, indent=2))
        return
    for record in records:
        if record["error"]:
            print(f"{record['name']}: FAILED TO LOAD ({record['error']})")
            continue
        print(f"{record['name']}: {', '.join(m['name'] for m in record['models']) or '(no models)'}")
        source = record["distribution"] or "registered in code"
        print(f"  distribution: {source}{' ' + record['version'] if record['version'] else ''}")
        for model in record["models"]:
            print(f"  model {model['name']}: {model['repo_id']}, template {model['template']}")
        print(f"  hooks: {', '.join(record['hooks'])}")


def _log(args: argparse.Namespace) -> None:
    from templated_llm.model_logging.log import log_llm

    info = log_llm(
        args.model, args.snapshot, name=args.name, template=args.template,
        attention=args.attention, dtype=args.dtype,
        registered_model_name=args.registered_model_name,
        trust_remote_code=args.trust_remote_code,
        pack_weights=args.pack_weights,
        # Unset limits keep log_llm's defaults.
        **{k: v for k in ("max_rows_per_request", "max_tokens_limit")
           if (v := getattr(args, k)) is not None},
    )
    print(info.model_uri)
    print(f"serve it with: templated-llm serve {info.model_uri}")


def serve_command(model_uri: str, *, host: str, port: int, workers: int, env_manager: str) -> list[str]:
    """The ``mlflow models serve`` command line for a logged model."""
    return [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
        "--env-manager", env_manager, "-h", host, "-p", str(port), "-w", str(workers),
    ]


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    try:
        return check_port(port)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# The server's defaults, read without building a config (which reads the API key's variable).
_SERVER_DEFAULTS = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(ServerConfig)})


def _serve(args: argparse.Namespace) -> int:
    if not args.mlflow_only:
        from templated_llm.serving import serve

        if args.workers is not None or args.env_manager is not None:
            raise argparse.ArgumentTypeError("--workers and --env-manager go with --mlflow-only")
        try:
            config = ServerConfig(
                args.model_uri, host=args.host, port=args.port,
                served_model_name=args.served_model_name, api_key=args.api_key,
                max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout,
                shutdown_timeout=args.shutdown_timeout, max_n=args.max_n, max_pending=args.max_pending,
            )
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return serve(config)
    # What plain mlflow models serve has no counterpart for: refused, not silently dropped (a
    # server the user believes needs a key, or bounds its bodies, must not run without).
    defaults = _SERVER_DEFAULTS
    ignored = [option for option, given in (
        ("--api-key", args.api_key is not None), (f"${API_KEY_ENV}", bool(os.environ.get(API_KEY_ENV))),
        ("--served-model-name", args.served_model_name is not None),
        *((f"--{name.replace('_', '-')}", getattr(args, name) != getattr(defaults, name))
          for name in ("max_body_bytes", "request_timeout", "shutdown_timeout", "max_n", "max_pending")),
    ) if given]
    if ignored:
        raise argparse.ArgumentTypeError(
            f"{', '.join(ignored)} apply to templated-llm's own server, not to --mlflow-only "
            "(plain mlflow models serve has no auth or such limits); leave them out or drop --mlflow-only")
    command = serve_command(args.model_uri, host=args.host, port=args.port,
                            workers=args.workers or 1, env_manager=args.env_manager or "local")
    print(" ".join(command), flush=True)
    # MLflow starts `uvicorn` from PATH: make it this interpreter's, even in an inactive venv.
    env = {**malloc_environment(), **os.environ,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    os.execve(command[0], command, env)  # the server takes this process over, signals included


def _demo(args: argparse.Namespace) -> None:
    from templated_llm.devtools.demo import run_demo

    run_demo(args.snapshot)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="templated-llm", description="Log Hugging Face causal LMs as MLflow models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("build-tiny-model", help="write a small random model snapshot")
    tiny.add_argument("path", type=Path, help="directory to write the snapshot to")
    tiny.add_argument("--architecture", choices=ARCHITECTURES, default="mpt",
                      help="model family (default mpt)")
    tiny.add_argument("--chat-template", type=Path,
                      help="Jinja chat template file to store on the tokenizer")
    tiny.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tiny.add_argument("--d-model", type=int, default=64, help="hidden size (default 64)")
    tiny.add_argument("--n-layers", type=int, default=2, help="transformer blocks (default 2)")
    tiny.add_argument("--n-heads", type=int, default=4, help="attention heads (default 4)")
    tiny.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary (default 1024)")
    tiny.add_argument("--max-seq-len", type=int, default=2048, help="context length (default 2048)")
    tiny.set_defaults(func=_build_tiny_model)

    new_plugin = commands.add_parser("new-plugin", help="write a new model plugin distribution")
    new_plugin.add_argument("name", help="the plugin's and its model's name, e.g. 'vicuna'")
    new_plugin.add_argument("--directory", type=Path,
                            help="where to write it (default ./templated-llm-NAME)")
    new_plugin.add_argument("--repo-id", help="the model's Hugging Face repository")
    new_plugin.add_argument("--architecture", choices=ARCHITECTURES, default="llama",
                            help="architecture of the small model its test builds (default llama)")
    new_plugin.set_defaults(func=_new_plugin)

    render = commands.add_parser("render", help="print the exact prompt a model will see")
    render.add_argument("model", help="model name, as listed by 'templated-llm plugins'")
    render.add_argument("--prompt", help="the user's prompt")
    render.add_argument("--messages", help="chat messages as JSON: [{\"role\": ..., \"content\": ...}]")
    render.add_argument("--system", help="system prompt, for models that take one")
    render.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                        help="another template variable; repeatable")
    render.add_argument("--template", help="Jinja template file replacing the plugin's")
    render.add_argument("--snapshot", type=Path,
                        help="local snapshot: show what its tokenizer reads, special tokens included")
    render.set_defaults(func=_render)

    plugins = commands.add_parser(
        "plugins", help="list plugins: distribution, models, hooks implemented, load errors")
    plugins.add_argument("--json", action="store_true", help="print JSON, for scripts")
    plugins.set_defaults(func=_plugins)

    log = commands.add_parser("log", help="log a model to the current MLflow tracking URI")
    log.add_argument("model", help="model name, as listed by 'templated-llm plugins'")
    log.add_argument("--snapshot", type=Path, help="local snapshot directory (default: download)")
    log.add_argument("--name", default="model", help="logged model name (default 'model')")
    log.add_argument("--template", help="Jinja template file replacing the plugin's")
    log.add_argument("--attention", default="auto",
                     help="attention backend: auto, eager, sdpa, triton, flash, or one a plugin "
                          "adds (default auto)")
    log.add_argument("--dtype", choices=get_args(DType), default="auto",
                     help="weights dtype (default auto: the checkpoint's where the device "
                          "computes it natively, else float32; chosen at load)")
    log.add_argument("--registered-model-name", help="also register a version under this name")
    log.add_argument("--trust-remote-code", action="store_true",
                     help="allow loading to run Python code shipped in the snapshot (off by default)")
    log.add_argument("--max-rows-per-request", type=int,
                     help="most prompts per request (default 64)")
    log.add_argument("--max-tokens-limit", type=int,
                     help="largest max_tokens a request may ask for (default 1024)")
    log.add_argument("--no-pack-weights", dest="pack_weights", action="store_false",
                     help="on CPU, keep nn.Linear instead of laying out the weights for oneDNN at load")
    log.set_defaults(func=_log)

    serve = commands.add_parser(
        "serve", help="serve a logged model: OpenAI's API under /v1 and MLflow's /invocations")
    serve.add_argument("model_uri", help="models:/<id>, models:/<name>/<version>, models:/<name>@<alias>, runs:/...")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=5001, help="port (default 5001)")
    d = _SERVER_DEFAULTS
    serve.add_argument("--served-model-name",
                       help="the name clients pass as 'model' (default: the registered model's "
                            "name, else the plugin's model name)")
    serve.add_argument("--api-key", help=f"bearer token required on /v1 and /invocations "
                                         f"(default: ${API_KEY_ENV} if set, else none)")
    serve.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                       help=f"largest request body; 413 beyond (default {d.max_body_bytes})")
    serve.add_argument("--request-timeout", type=float, default=d.request_timeout,
                       help=f"seconds before a request is answered 504 (default {d.request_timeout:g})")
    serve.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                       help=f"seconds running requests get after SIGTERM (default {d.shutdown_timeout:g})")
    serve.add_argument("--max-n", type=int, default=d.max_n,
                       help=f"largest 'n' (choices per prompt) a request may ask for (default {d.max_n})")
    serve.add_argument("--max-pending", type=int, default=d.max_pending,
                       help=f"sequences generating or waiting at once; 429 beyond (default {d.max_pending})")
    serve.add_argument("--mlflow-only", action="store_true",
                       help="run plain 'mlflow models serve' instead (no /v1 routes)")
    serve.add_argument("--workers", type=int,
                       help="with --mlflow-only: server processes, each with its own copy of the "
                            "model (default 1)")
    serve.add_argument("--env-manager", choices=["local", "virtualenv", "uv", "conda"],
                       help="with --mlflow-only: 'local' serves from this environment; the others "
                            "build the logged requirements into a fresh one (default local)")
    serve.set_defaults(func=_serve)

    demo = commands.add_parser("demo", help="build the small MPT, log, load and predict")
    demo.add_argument("--snapshot", type=Path, default=Path(".cache/tiny-mpt"),
                      help="where the small snapshot lives (default .cache/tiny-mpt)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        status = args.func(args)
    except Exception as exc:  # noqa: BLE001 - a CLI reports errors, it does not dump traces
        from templated_llm.errors import user_message

        message = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else user_message(exc)
        if message is None and isinstance(exc, OSError) and exc.filename is not None:
            message = f"{exc.strerror}: {exc.filename}"  # a path the command cannot write or read
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
