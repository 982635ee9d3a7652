"""Token counts are exact in batches: a row a stop string ends while others go on counts its own
tokens, not the padding after them."""

from __future__ import annotations

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, GenerationConfig

from templated_llm.runtime.generation import generate_completions
from templated_llm.runtime.params import GenerationParams
from templated_llm.runtime.tokens import prepare_tokenizer

PROMPTS = ["Name three rivers.", "Hi", "What is machine learning?", "Tell me a story about a cat."]
USAGE = {"temperature": 0.0, "max_tokens": 12, "return_usage": True}


def _usage(model, prompts: list[str], **params) -> list[tuple[str, int, str]]:
    out = model.predict(prompts, params={**USAGE, **params})
    return list(zip(out["candidates"], out["completion_tokens"], out["finish_reason"]))


def _alone(model, prompts: list[str], **params) -> list[tuple[str, int, str]]:
    """Each row generated alone: no other row pads it, so its count is its output's length."""
    return [_usage(model, [prompt], **params)[0] for prompt in prompts]


def test_a_row_a_stop_ends_early_counts_its_own_tokens(loaded_model):
    prompts = PROMPTS[2:]  # the tiny model's completions of these two differ early
    first, second = (text for text, _, _ in _usage(loaded_model, prompts))
    stop = next(first[i:i + 2] for i in range(len(first) - 1) if first[i:i + 2] not in second)
    batched = _usage(loaded_model, prompts, stop=[stop])
    assert batched[0][2] == "stop" and batched[1][2] == "length"  # the second row went on
    assert batched == _alone(loaded_model, prompts, stop=[stop])


@settings(max_examples=12, deadline=None)
@given(data=st.data(), rows=st.lists(st.sampled_from(PROMPTS), min_size=2, max_size=4, unique=True))
def test_counts_in_a_batch_with_stops_equal_each_row_alone(loaded_model, data, rows):
    texts = [text for text, _, _ in _usage(loaded_model, rows)]
    row = data.draw(st.integers(0, len(rows) - 1))
    assume(len(texts[row]) >= 2)
    start = data.draw(st.integers(0, len(texts[row]) - 2))
    stop = texts[row][start:start + data.draw(st.integers(1, 3))]
    assert _usage(loaded_model, rows, stop=[stop]) == _alone(loaded_model, rows, stop=[stop])


class _Replay:
    """A model whose generate returns the given new tokens after the prompt, calling the
    stopping criteria after each token as transformers does."""

    generation_config = GenerationConfig()

    def __init__(self, new_tokens: list[list[int]]) -> None:
        self.new_tokens = torch.tensor(new_tokens)

    def generate(self, input_ids, stopping_criteria=(), **kwargs):
        for step in range(1, self.new_tokens.shape[1] + 1):
            for criterion in stopping_criteria:
                criterion(torch.cat([input_ids, self.new_tokens[:, :step]], dim=1), None)
        return torch.cat([input_ids, self.new_tokens], dim=1)


def test_counts_for_each_way_a_row_ends(tiny_snapshot):
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_snapshot))
    pad = end = tokenizer.eos_token_id  # as for MPT: no pad token, the end token pads
    three = tokenizer(" three", add_special_tokens=False).input_ids
    one, two, four = (tokenizer(w, add_special_tokens=False).input_ids[0] for w in (" on", " t", " fo"))
    rows = [
        [one, two, end, pad, pad],      # ended on the end token: it counts
        [one, *three, pad, pad, pad][:5],  # ended on a stop string: the padding does not count
        [four] * 5,                     # ran to max_tokens
    ]
    batch = {"input_ids": torch.ones(3, 2, dtype=torch.long), "attention_mask": torch.ones(3, 2, dtype=torch.long)}
    params = GenerationParams(temperature=0.0, max_tokens=5, stop=["three"])
    completions = generate_completions(_Replay(rows), tokenizer, batch, params, "cpu")
    assert [(c.completion_tokens, c.finish_reason) for c in completions] == [
        (3, "stop"), (1 + len(three), "stop"), (5, "length")]


def test_a_pad_token_that_is_no_end_token_neither_ends_nor_miscounts_a_row(tiny_snapshot):
    # As Llama-2 fine-tunes padding with <unk>: a pad token the model generates is a token.
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_snapshot))
    one, two, pad = (tokenizer(w, add_special_tokens=False).input_ids[0] for w in (" on", " t", " fo"))
    end, tokenizer.pad_token_id = tokenizer.eos_token_id, pad
    rows = [[one, pad, two, two, end], [one, end, pad, pad, pad]]
    batch = {"input_ids": torch.ones(2, 2, dtype=torch.long), "attention_mask": torch.ones(2, 2, dtype=torch.long)}
    completions = generate_completions(_Replay(rows), tokenizer, batch, GenerationParams(max_tokens=5), "cpu")
    assert [(c.completion_tokens, c.finish_reason) for c in completions] == [(5, "stop"), (2, "stop")]
