"""The parts of the docs that show benchmark figures, generated from ``latest.json``.

No figure in the docs is copied by hand: each sits in a block between ``<!-- generated: NAME -->``
and ``<!-- end generated -->``, NAME one of :data:`SECTIONS`, rewritten from the results.
``python -m benchmarks`` does it after a run into ``benchmarks/results``;
``python -m benchmarks.pages`` does it from the ``latest.json`` there (and rewrites ``latest.md``
and ``latest.png`` from it too).
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.report import markdown, write

REPO = Path(__file__).resolve().parents[1]
LATEST = REPO / "benchmarks" / "results" / "latest.json"
PAGES = (REPO / "docs" / "benchmarks.md", REPO / "docs" / "scaling.md")
_BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n).*?(<!-- end generated -->)", re.DOTALL)


def _machine(results: dict[str, Any]) -> str:
    m = results["machine"]
    return f"{m['cpus']} CPU cores, {m['torch_threads']} torch thread(s) per process"


def _scaling_example(results: dict[str, Any]) -> str:
    """Spark sizing worked out from the headline's tokens/s."""
    headline = results["contenders"][results["headline"]]
    rate, s = headline["tokens_per_s"], results["settings"]
    hours = 1e6 * s["new_tokens"] / (50 * rate * 3600)
    return (f"Worked example with the reference run ({results['snapshot']['parameters'] / 1e6:.0f}M-parameter "
            f"MPT, {_machine(results)}: see [benchmarks.md](benchmarks.md)): one copy of "
            f"{headline['label'].split('. ', 1)[1]} generated {rate:.0f} tokens/s on batches of "
            f"{s['prompts']} prompts; 1,000,000 prompts of {s['new_tokens']} new tokens on 50 such copies "
            f"take 1e6 * {s['new_tokens']} / (50 * {rate:.0f} * 3600) = {hours:.1f} hours.\n")


def _replicas_example(results: dict[str, Any]) -> str:
    """Replica count worked out from the headline's served requests/s."""
    served, s = results["details"]["served"][results["headline"]], results["settings"]
    rate = served["requests_per_s"]
    return (f"In the reference run one replica (one worker, {_machine(results)}) served "
            f"{rate:.2f} requests/s of {s['serve_tokens']} new tokens under {s['clients']} concurrent "
            f"clients, so 20 requests/s of the same size need `replicas(20, {rate:.2f})` = "
            f"{math.ceil(20 / (rate * 0.7))} replicas.\n")


def _from_file(name: str, render_file: Callable[[dict[str, Any]], str], command: str
               ) -> Callable[[dict[str, Any]], str]:
    """A block rendered from the results file ``name`` beside latest.json, which ``command``
    writes; until it has run, the block says so."""
    def block(results: dict[str, Any]) -> str:
        path = LATEST.parent / name
        if not path.is_file():
            return f"Not measured yet: `{command}` writes `benchmarks/results/{name}`.\n"
        return render_file(json.loads(path.read_text()))

    return block


def _imported(module: str, function: str, **kwargs: Any) -> Callable[[dict[str, Any]], str]:
    """``module.function(results, **kwargs)``, imported only when a block is rendered: the
    benchmark modules import torch and the harness."""
    def render(results: dict[str, Any]) -> str:
        return getattr(importlib.import_module(module), function)(results, **kwargs)

    return render


SECTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "benchmark-results": markdown,
    "scaling-example": _scaling_example,
    "replicas-example": _replicas_example,
    # The full-size runs, the mixed workload, serving, decode attention and the linear layers:
    # each from its own results file.
    **{f"full-size-{size}": _from_file(f"full-size-{size}.json",
                                        _imported("benchmarks.full_size_report", "markdown", heading=""),
                                        f"python -m benchmarks --size {size}")
       for size in ("mpt-7b", "25m", "mpt-7b-scaled")},
    "mixed": _from_file("mixed.json", _imported("benchmarks.mixed", "markdown"), "python -m benchmarks.mixed"),
    # The workload (the default) and short generations (--max-tokens 16 64 --prompt-words
    # 16 256), in each dtype.
    **{f"serving{dtype}{tag}": _from_file(
        f"serving{dtype}{tag}.json", _imported("benchmarks.serving", "markdown"),
        "python -m benchmarks.serving" + (" --dtype bfloat16" if dtype else "")
        + (" --max-tokens 16 64 --prompt-words 16 256 --tag short" if tag else ""))
       for dtype in ("", "-bfloat16") for tag in ("", "-short")},
    # Every request greedy, as transformers serve decodes them all after its greedy warm-up.
    "serving-greedy": _from_file("serving-greedy.json", _imported("benchmarks.serving", "markdown"),
                                 "python -m benchmarks.serving --greedy --tag greedy"),
    **{f"decode-attention{dtype}": _from_file(
        f"decode-attention{dtype}.json", _imported("benchmarks.decode_attention", "report"),
        "python -m benchmarks.decode_attention" + (" --dtype bfloat16" if dtype else "")
        + f" --out benchmarks/results/decode-attention{dtype}.json")
       for dtype in ("", "-bfloat16")},
    **{f"linear-d{d}": _from_file(f"linear-d{d}.json", _imported("benchmarks.linear", "report"),
                                  f"python -m benchmarks.linear --d-model {d} "
                                  f"--out benchmarks/results/linear-d{d}.json")
       for d in (512, 1024, 2048, 4096)},
}


def render(text: str, results: dict[str, Any]) -> str:
    """``text`` with every generated block rewritten from ``results``."""
    def block(match: re.Match) -> str:
        if match.group(2) not in SECTIONS:
            raise ValueError(f"unknown generated block {match.group(2)!r}; known: {sorted(SECTIONS)}")
        return match.group(1) + SECTIONS[match.group(2)](results) + match.group(3)

    return _BLOCK.sub(block, text)


def update(results: dict[str, Any]) -> None:
    for page in PAGES:
        page.write_text(render(page.read_text(), results))


if __name__ == "__main__":
    # The results' Markdown and chart, then the docs, from latest.json as it is.
    latest = json.loads(LATEST.read_text())
    write(latest, LATEST.parent)
    update(latest)
