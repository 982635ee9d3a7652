"""Contender 1: the hand-written MPT pyfunc of MLflow's classic custom-pyfunc LLM tutorial.

Reproduced as the tutorial writes it ("Serving LLMs with MLflow: Leveraging Custom PyFunc"):
one prompt per call (``model_input["prompt"][0]``), the snapshot's generation config as shipped
(MPT's ``use_cache: false``), the prompt encoded twice, ``generate(encoded, max_new_tokens=...)``.
Two changes make it comparable with the other contenders, and neither makes it slower: greedy
decoding instead of ``do_sample=True`` (every contender is greedy), and float32 instead of
bfloat16 (every contender runs the same float32 weights on CPU).
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
import transformers
from mlflow.models.signature import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema


class MPT(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            context.artifacts["snapshot"], padding_side="left"
        )
        config = transformers.AutoConfig.from_pretrained(
            context.artifacts["snapshot"], trust_remote_code=True
        )
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            context.artifacts["snapshot"],
            config=config,
            dtype=torch.float32,  # the tutorial: bfloat16
            trust_remote_code=True,
        )
        self.model.to(device="cpu")
        self.model.eval()

    def _build_prompt(self, instruction):
        INSTRUCTION_KEY = "### Instruction:"
        RESPONSE_KEY = "### Response:"
        INTRO_BLURB = (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
        )

        return f"""{INTRO_BLURB}
      {INSTRUCTION_KEY}
      {instruction}
      {RESPONSE_KEY}
      """

    def predict(self, context, model_input, params=None):
        prompt = model_input["prompt"][0]
        max_tokens = params.get("max_tokens", 1000) if params else 1000
        prompt = self._build_prompt(prompt)
        encoded_input = self.tokenizer.encode(prompt, return_tensors="pt").to("cpu")
        output = self.model.generate(
            encoded_input,
            do_sample=False,  # the tutorial: do_sample=True, temperature=temperature
            max_new_tokens=max_tokens,
        )
        prompt_length = len(self.tokenizer.encode(prompt, return_tensors="pt")[0])
        generated_response = self.tokenizer.decode(
            output[0][prompt_length:], skip_special_tokens=True
        )
        return {"candidates": [generated_response]}


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, "prompt")]),
    outputs=Schema([ColSpec(DataType.string, "candidates")]),
    params=ParamSchema([
        ParamSpec("temperature", DataType.float, np.float32(0.1), None),
        ParamSpec("max_tokens", DataType.integer, np.int32(1000), None),
    ]),
)
INPUT_EXAMPLE = pd.DataFrame({"prompt": ["What is machine learning?"]})
