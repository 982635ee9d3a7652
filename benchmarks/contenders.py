"""The four ways to serve the same snapshot, each logged to MLflow (except plain transformers)
and answering ``complete(prompts, max_tokens)`` with greedy completions."""

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
from templated_llm.errors import TemplatedLLMError
from templated_llm.model_logging.log import log_llm
from templated_llm.plugins.attention import backends
from templated_llm.runtime.templates import PromptTemplate, find_template

MODEL = "mpt-instruct"
GREEDY = {"temperature": 0.0}


@dataclass
class Contender:
    name: str
    label: str
    complete: Callable[[list[str], int], list[str]]
    serial: bool  # generates one prompt at a time
    model_uri: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _pins(*packages: str) -> list[str]:
    return [f"{p}=={importlib.metadata.version(p).split('+')[0]}" for p in packages]


def render(prompts: list[str]) -> list[str]:
    """The text TemplatedLLM's MPT template makes of each prompt; fed as is to contenders 2 and 3."""
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

    return Contender("tutorial", "1. tutorial pyfunc", complete, serial=True,
                     model_uri=info.model_uri)


def _first(prediction: Any) -> str:
    candidates = prediction["candidates"]
    return str(candidates[0] if isinstance(candidates, list) else candidates.iloc[0])


class PlainGenerate:
    """Contender 2: transformers done right: batched, left-padded, KV cache on, eager attention."""

    def __init__(self, snapshot: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(snapshot, padding_side="left")
        self.tokenizer.pad_token = self.tokenizer.pad_token or self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            snapshot, dtype=torch.float32, attn_implementation="eager").eval()

    def tokens(self, texts: list[str], max_tokens: int) -> torch.Tensor:
        batch = self.tokenizer(texts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            output = self.model.generate(**batch, max_new_tokens=max_tokens, do_sample=False,
                                         use_cache=True, pad_token_id=self.tokenizer.pad_token_id)
        return output[:, batch["input_ids"].shape[1]:]

    def complete(self, prompts: list[str], max_tokens: int) -> list[str]:
        return self.tokenizer.batch_decode(self.tokens(render(prompts), max_tokens),
                                           skip_special_tokens=True)


def plain(snapshot: Path) -> Contender:
    runner = PlainGenerate(snapshot)
    return Contender("plain", "2. plain transformers", runner.complete, serial=False,
                     extra={"runner": runner})


def transformers_flavor(snapshot: Path) -> Contender:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    generator = pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained(snapshot),
                         tokenizer=AutoTokenizer.from_pretrained(snapshot))
    info = mlflow.transformers.log_model(
        transformers_model=generator, name="transformers-flavor", task="llm/v1/completions",
        # Explicit: inferring them imports torchvision, which this environment does not have.
        pip_requirements=_pins("mlflow", "torch", "transformers", "accelerate", "tokenizers"),
    )
    del generator
    model = mlflow.pyfunc.load_model(info.model_uri)

    def complete(prompts: list[str], max_tokens: int) -> list[str]:
        texts = render(prompts)
        rows = model.predict(pd.DataFrame({"prompt": texts, "max_tokens": [max_tokens] * len(texts)}))
        return [row["choices"][0]["text"] for row in rows]

    return Contender("transformers_flavor", "3. MLflow transformers flavor", complete,
                     serial=True, model_uri=info.model_uri)


def templated(snapshot: Path) -> tuple[list[Contender], dict[str, str]]:
    """Contender 4, once per attention backend that logs and loads here; why the others do not."""
    contenders, unavailable = [], {}
    for backend in (entry.name for entry in backends()):
        try:
            info = log_llm(MODEL, snapshot=snapshot, name=f"templated-{backend}", attention=backend)
            model = mlflow.pyfunc.load_model(info.model_uri)
        except (TemplatedLLMError, ValueError, ImportError, RuntimeError) as exc:
            unavailable[backend] = str(exc).splitlines()[0]
            continue
        in_use = model.unwrap_python_model().attention
        if in_use != backend:
            unavailable[backend] = f"log_llm accepted it but the model runs {in_use!r}"
            continue

        def complete(prompts: list[str], max_tokens: int, model=model) -> list[str]:
            result = model.predict(prompts, params={**GREEDY, "max_tokens": max_tokens})
            return result["candidates"].tolist()

        contenders.append(Contender(f"templated_{backend}", f"4. TemplatedLLM ({backend})",
                                    complete, serial=False, model_uri=info.model_uri,
                                    extra={"pyfunc": model}))
    return contenders, unavailable
