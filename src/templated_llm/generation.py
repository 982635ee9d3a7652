"""Batched text generation with a Hugging Face causal LM."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch

from templated_llm.params import GenerationParams

_CONTEXT_ATTRIBUTES = ("max_seq_len", "max_position_embeddings", "n_positions", "seq_length")


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Make a tokenizer fit for batched generation: left padding and a pad token.

    Decoder-only models continue from the last position, so padding goes on the left; GPT-NeoX
    style tokenizers (MPT's) have no pad token, and the end-of-text token serves, masked out.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def context_length(model: Any) -> int | None:
    """The longest sequence (prompt plus new tokens) the model accepts, if its config says."""
    for attribute in _CONTEXT_ATTRIBUTES:
        value = getattr(model.config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenize(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids of all prompts, in one tokenizer call, unpadded."""
    return tokenizer(prompts)["input_ids"]


def pad(tokenizer: Any, input_ids: list[list[int]], device: str) -> dict[str, torch.Tensor]:
    """One batch of token ids, left-padded to a common length, with its attention mask."""
    return tokenizer.pad({"input_ids": input_ids}, return_tensors="pt").to(device)


def _generation_config(model: Any, tokenizer: Any, params: GenerationParams) -> Any:
    config = copy.deepcopy(model.generation_config)
    # Unset (None) rather than neutral values, which transformers warns about.
    sampling = {"temperature": None, "top_p": None, "top_k": None}
    if not params.greedy:
        sampling = {"temperature": params.temperature, "top_p": params.top_p,
                    "top_k": params.top_k or None}
    config.update(
        do_sample=not params.greedy,
        max_new_tokens=params.max_tokens,
        repetition_penalty=params.repetition_penalty,
        # MPT checkpoints ship use_cache=false; without the KV cache every step re-reads the
        # whole sequence and generation turns quadratic.
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id,
        stop_strings=params.stop or None,
        **sampling,
    )
    return config


@contextlib.contextmanager
def _seeded(seed: int | None, device: str) -> Iterator[None]:
    if seed is None:
        yield
        return
    # Fork the RNG so a seeded request does not reset the process-wide random state.
    devices = [torch.device(device)] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _cut_at_stop(text: str, stop: list[str]) -> str:
    positions = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(positions)] if positions else text


def generate(
    model: Any, tokenizer: Any, batch: dict[str, torch.Tensor], params: GenerationParams, device: str
) -> list[str]:
    """Generate a completion for every row of an encoded batch in one ``generate`` call.

    The prompt is cut off by token position (not by matching text), so a completion that
    repeats the prompt, or a tokenizer that does not round-trip, cannot corrupt the result.
    """
    config = _generation_config(model, tokenizer, params)
    with torch.inference_mode(), _seeded(params.seed, device):
        output = model.generate(**batch, generation_config=config, tokenizer=tokenizer)
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [_cut_at_stop(text, params.stop) for text in texts]
