"""The engine decodes a stream's text a few tokens at a time: the text is the whole decode's."""

from __future__ import annotations

import queue

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from templated_llm.engine.sequence import SequenceState
from templated_llm.runtime.generation import _RowEnds, _Streamer
from templated_llm.runtime.params import GenerationParams

_CORPUS = ["Name three rivers: the Nile, the Rhône and the Yangtze (长江).",
           "The cache holds keys and values; ünïcödé 🙂 words split across tokens.",
           "  leading spaces, tabs\tand\nnew lines matter too!"] * 20


@pytest.fixture(scope="module")
def byte_level(tiny_snapshot):
    return AutoTokenizer.from_pretrained(tiny_snapshot)  # the project's tiny models' kind


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A Metaspace tokenizer (Llama's and Mistral's kind): its decoder drops the space of a
    text's first word, so a token decodes differently at the start of a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tokenizer.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *bytes_], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def _streamed_whole_batch(tokenizer, ids: list[int]) -> str:
    """What the whole-batch path's stream (transformers' generate with its streamer) sends:
    each token is decoded by the stopping criteria, then handed to the streamer."""
    row_ends = _RowEnds(tokenizer, [], set(), rows=1, streamed=True)
    streamer = _Streamer(tokenizer, row_ends.texts[0])
    streamer.put(torch.tensor([[1]]))  # the prompt, skipped
    for token in ids:
        row_ends(torch.tensor([[token]]), None)
        streamer.put(torch.tensor([token]))
    streamer.end()
    return "".join(streamer)


def _streamed(tokenizer, ids: list[int]) -> tuple[SequenceState, str]:
    state = SequenceState(prompt_ids=[1], params=GenerationParams(), generator=None)
    for token in ids:
        state.generated.append(token)
        state.decode(tokenizer)
    pieces = []
    while True:
        try:
            pieces.append(state.deltas.get_nowait())
        except queue.Empty:
            return state, "".join(pieces)


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece_like"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_decoding_a_few_tokens_at_a_time_gives_the_whole_decode(request, kind, data):
    tokenizer = request.getfixturevalue(kind)
    # Encoded text (real token sequences: words, spaces, characters split across byte tokens)
    # with random tokens mixed in, special ones included.
    text = data.draw(st.text(alphabet=st.sampled_from(sorted(set("".join(_CORPUS)))), max_size=60))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    ids += data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=12))
    ids = data.draw(st.permutations(ids)) if data.draw(st.booleans()) else ids
    state, streamed = _streamed(tokenizer, ids)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert streamed == state.text
    if not whole.endswith("\ufffd"):  # otherwise the end waits for a character's last bytes
        assert state.text == whole
    # The whole-batch path's stream decodes alike, and sends what is held back at the end.
    assert _streamed_whole_batch(tokenizer, ids) == whole


def test_each_step_decodes_only_the_new_tokens(byte_level):
    decoded = []

    class Counting:
        def decode(self, ids, **kwargs):
            decoded.append(len(ids))
            return byte_level.decode(ids, **kwargs)

    ids = byte_level("the river and the sea " * 40, add_special_tokens=False).input_ids
    state, streamed = _streamed(Counting(), ids)
    assert streamed == byte_level.decode(ids) and len(ids) > 100
    assert max(decoded) <= 2  # the window: the tokens read last step and the new one
