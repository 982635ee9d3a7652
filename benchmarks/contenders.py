"""The ways to serve the same snapshot, each logged to MLflow (except plain transformers) and
answering ``complete(prompts, max_tokens)`` with greedy completions.

Every contender's new tokens are counted (see counting.py): a call that made fewer (or more)
than asked stops the run.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch

from benchmarks import tutorial_mpt
from benchmarks.counting import Counted, check_tokens, generate_spy
from templated_llm.errors import TemplatedLLMError
from templated_llm.model_logging.log import log_llm
from templated_llm.plugins.attention import backends
from templated_llm.runtime.device import default_device
from templated_llm.runtime.templates import PromptTemplate, find_template

MODEL = "mpt-instruct"
# Why a run on a CPU does not time triton (docs/benchmarks.md says more).
_TRITON_ON_CPU = ("not timed on a CPU: auto never picks it there, and on the engine each step "
                  "runs flex_attention padded to every slot's whole length, so a round of the "
                  "throughput batch would take many minutes")
GREEDY = {"temperature": 0.0}
# The request formats: each kind of contender takes its prompts and params its own way.
TUTORIAL, PLAIN, FLAVOR, TEMPLATED = "tutorial", "plain", "flavor", "templated"


@dataclass
class Contender:
    name: str
    label: str
    generate_texts: Callable[[list[str], int], list[str]]
    model: Any  # the transformers model it runs
    counted: Counted  # the new tokens of each row it generates
    kind: str
    serial: bool  # generates one prompt at a time
    model_uri: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def complete(self, prompts: list[str], max_tokens: int) -> list[str]:
        """Greedy completions of ``max_tokens`` new tokens each, counted as they are generated."""
        self.counted.take()  # rows generated outside a counted call are not this call's
        texts = self.generate_texts(prompts, max_tokens)
        check_tokens(self.label, self.counted.take(), len(prompts), max_tokens)
        return texts


def _pins(*packages: str) -> list[str]:
    return [f"{p}=={importlib.metadata.version(p).split('+')[0]}" for p in packages]


def render(prompts: list[str]) -> list[str]:
    """The text TemplatedLLM's MPT template makes of each prompt; fed as is to plain transformers
    and the transformers flavor."""
    template = PromptTemplate.from_file(find_template("mpt-instruct.jinja"))
    return [template.render(p) for p in prompts]


def tutorial(snapshot: Path) -> Contender:
    info = mlflow.pyfunc.log_model(
        name="tutorial-mpt", python_model=tutorial_mpt.MPT(),
        artifacts={"snapshot": str(snapshot)}, signature=tutorial_mpt.SIGNATURE,
        pip_requirements=_pins("torch", "transformers", "accelerate"),
    )
    model = mlflow.pyfunc.load_model(info.model_uri)

    def complete(prompts: list[str], max_tokens: int) -> list[str]:
        return [
            _first(model.predict(pd.DataFrame({"prompt": [p]}), params={"max_tokens": max_tokens}))
            for p in prompts
        ]

    hf_model = model.unwrap_python_model().model
    return Contender("tutorial", "1. tutorial pyfunc", complete, hf_model, generate_spy(hf_model),
                     TUTORIAL, serial=True, model_uri=info.model_uri)


def _first(prediction: Any) -> str:
    candidates = prediction["candidates"]
    return str(candidates[0] if isinstance(candidates, list) else candidates.iloc[0])


def generate_texts(model: Any, tokenizer: Any, texts: list[str], max_tokens: int) -> list[str]:
    """transformers done right: one batched, left-padded ``generate`` with the KV cache on."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        output = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, use_cache=True,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def plain(snapshot: Path, dtype: torch.dtype = torch.float32) -> Contender:
    """Contender 2: AutoModelForCausalLM with eager attention and ``generate_texts``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(snapshot, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        snapshot, dtype=dtype, attn_implementation="eager").eval()
    return Contender("plain", "2. plain transformers",
                     lambda prompts, n: generate_texts(model, tokenizer, render(prompts), n),
                     model, generate_spy(model), PLAIN, serial=False, extra={"tokenizer": tokenizer})


def transformers_flavor(snapshot: Path, *, fair: bool) -> Contender:
    """Contender 3: a ``text-generation`` pipeline logged with ``mlflow.transformers``.

    As logged by default (``fair=False``) it generates with the snapshot's ``use_cache: false``,
    one prompt at a time. The fair variant sets ``model_config`` to what the flavor allows: the
    KV cache on and the pipeline batching a request's prompts.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    if fair:  # a batch needs left padding and a pad token
        tokenizer.padding_side = "left"
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    generator = pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained(snapshot),
                         tokenizer=tokenizer)
    name = "transformers_flavor_fair" if fair else "transformers_flavor"
    info = mlflow.transformers.log_model(
        transformers_model=generator, name=name.replace("_", "-"), task="llm/v1/completions",
        model_config={"use_cache": True, "batch_size": 64} if fair else None,
        # Explicit: inferring them imports torchvision, which this environment does not have.
        pip_requirements=_pins("mlflow", "torch", "transformers", "accelerate", "tokenizers"),
    )
    del generator
    model = mlflow.pyfunc.load_model(info.model_uri)

    def complete(prompts: list[str], max_tokens: int) -> list[str]:
        texts = render(prompts)
        rows = model.predict(pd.DataFrame({"prompt": texts, "max_tokens": [max_tokens] * len(texts)}))
        return [row["choices"][0]["text"] for row in rows]

    label = ("3. MLflow transformers flavor, cache on, batched" if fair
             else "3. MLflow transformers flavor, as logged")
    hf_model = model.get_raw_model().model
    return Contender(name, label, complete, hf_model, generate_spy(hf_model), FLAVOR, serial=not fair,
                     model_uri=info.model_uri)


def templated_with(snapshot: Path, attention: str, label: str) -> Contender:
    """TemplatedLLM logged with ``attention`` (and the default dtype, ``auto``), loaded."""
    info = log_llm(MODEL, snapshot=snapshot, name=f"templated-{attention}", attention=attention)
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    counted = Counted()

    def complete(prompts: list[str], max_tokens: int) -> list[str]:
        # predict runs on the engine, not generate: the rows' own counts (usage) are the count.
        out = pyfunc.predict(prompts, params={**GREEDY, "max_tokens": max_tokens, "return_usage": True})
        counted.rows.extend(out["completion_tokens"].tolist())
        return out["candidates"].tolist()

    python_model = pyfunc.unwrap_python_model()
    return Contender(f"templated_{python_model.attention}", label.format(python_model.attention),
                     complete, python_model.model, counted, TEMPLATED, serial=False,
                     model_uri=info.model_uri, extra={"pyfunc": pyfunc})


def templated(snapshot: Path) -> tuple[Contender, list[Contender], dict[str, str]]:
    """Contender 4 as logged by default (``attention="auto"``), then once per other attention
    backend that logs and loads here; why the others do not."""
    default = templated_with(snapshot, "auto", "4. TemplatedLLM, default (auto: {})")
    others, unavailable = [], {}
    for backend in (entry.name for entry in backends()):  # the attention table, without auto
        if backend == default.name.removeprefix("templated_"):
            continue
        if backend == "triton" and default_device() == "cpu":
            unavailable[backend] = _TRITON_ON_CPU
            continue
        try:
            contender = templated_with(snapshot, backend, "4. TemplatedLLM ({})")
        except (TemplatedLLMError, ValueError, ImportError, RuntimeError) as exc:
            unavailable[backend] = str(exc).splitlines()[0]
            continue
        if contender.name != f"templated_{backend}":
            unavailable[backend] = f"log_llm accepted it but the model runs {contender.name!r}"
            continue
        others.append(contender)
    return default, others, unavailable
