"""The tokens stage: rendered prompts to token ids that fit the model's context, and padded batches.

Prompt plus ``max_tokens`` must fit the context, and a request's rows the KV cache budget; what
cannot is a 400 before any generation.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from mlflow.exceptions import MlflowException

from templated_llm.spec import ModelSpec

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


def add_special_tokens(spec: ModelSpec) -> bool:
    """Whether tokenizing a rendered prompt adds the tokenizer's special tokens (its bos).

    A tokenizer's chat template writes those itself, so they are not added twice.
    """
    return not spec.tokenizer_chat_template


def context_length(model: Any) -> int | None:
    """The longest sequence (prompt plus new tokens) the model accepts, if its config says."""
    for attribute in _CONTEXT_ATTRIBUTES:
        value = getattr(model.config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenize(tokenizer: Any, prompts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of all prompts, in one tokenizer call, unpadded.

    ``add_special_tokens=False`` for text that already carries them (a chat template's output).
    """
    return tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]


def pad(tokenizer: Any, input_ids: list[list[int]], device: str) -> dict[str, torch.Tensor]:
    """One batch of token ids, left-padded to a common length, with its attention mask."""
    return tokenizer.pad({"input_ids": input_ids}, return_tensors="pt").to(device)


def _max_prompt_chars(tokenizer: Any, context: int | None) -> int | None:
    """A length no text that fits ``context`` tokens can exceed.

    A token covers at most as many characters as its longest vocabulary entry (byte-level and
    SentencePiece entries spell out at least the text they stand for); doubled for
    normalizers that compose characters.
    """
    if context is None:
        return None
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    return 2 * context * max(longest, 1)


class PromptTokens:
    """The tokens stage of one loaded model: its tokenizer, within its context length."""

    def __init__(self, tokenizer: Any, context: int | None, add_special_tokens: bool,
                 context_name: str = "the model's context", cache_tokens: int | None = None,
                 rows_alone: bool = False) -> None:
        self.tokenizer = tokenizer
        self.context_length = context
        self.context_name = context_name  # what sets the limit, for the error messages
        self.cache_tokens = cache_tokens  # the whole-batch path's KV cache budget a request must fit
        # Each row generates in a context of its own (the engine): a short row is not held to
        # what its request's longest one leaves.
        self.rows_alone = rows_alone
        self.add_special_tokens = add_special_tokens
        self._max_prompt_chars = _max_prompt_chars(tokenizer, context)
        # transformers reconfigures the shared Rust tokenizer per call, and calls at once can
        # fail ("Already borrowed"): tokenizing is serialised, and cheap next to generating.
        self._lock = threading.Lock()

    def encode(self, prompts: list[str], max_tokens: int, fit: bool = False, first_row: int = 0
               ) -> tuple[list[list[int]], list[int]]:
        """Each prompt's token ids, and the ``max_tokens`` each generates with; raises
        ``MlflowException`` (HTTP 400) when a prompt plus its ``max_tokens`` cannot fit the
        context, or the rows the KV cache budget.

        ``fit``: ``max_tokens`` is a default the caller did not choose, so it shrinks to what the
        context (and the whole-batch KV cache budget) leaves after the prompt, or after the
        longest prompt where rows are padded to it (OpenAI's meaning of an omitted ``max_tokens``).

        ``first_row``: the number a refusal gives the first prompt (its place in the caller's
        request, where the caller sends its prompts one at a time).
        """
        self._check_chars(prompts, first_row)
        with self._lock:
            input_ids = tokenize(self.tokenizer, prompts, self.add_special_tokens)
        self._check_prompts(input_ids, first_row)
        longest = max(len(ids) for ids in input_ids)
        lengths = [len(ids) if self.rows_alone else longest for ids in input_ids]
        limits = [limit for limit in (self.context_length, self._cache_share(len(input_ids))) if limit is not None]
        row_tokens = [max_tokens] * len(input_ids)
        if fit:
            # Where nothing is left (a cache budget too small for the rows), the check says so.
            rooms = [min((limit - length for limit in limits), default=max_tokens) for length in lengths]
            row_tokens = [min(max_tokens, room) if room >= 1 else max_tokens for room in rooms]
        self._check_context(lengths, row_tokens, first_row)
        return input_ids, row_tokens

    def pad(self, input_ids: list[list[int]], device: str) -> dict[str, torch.Tensor]:
        """One batch of token ids, left-padded, on ``device``."""
        return pad(self.tokenizer, input_ids, device)

    def _check_chars(self, prompts: list[str], first_row: int) -> None:
        # Rejects, without tokenizing it, text too long to fit the context whatever its tokens.
        for row, text in enumerate(prompts, first_row):
            if self._max_prompt_chars is not None and len(text) > self._max_prompt_chars:
                raise MlflowException.invalid_parameter_value(
                    f"the prompt at row {row} is {len(text)} characters after templating; no text "
                    f"over {self._max_prompt_chars} characters fits {self.context_name} of "
                    f"{self.context_length} tokens. Shorten the prompt."
                )

    def _check_prompts(self, input_ids: list[list[int]], first_row: int) -> None:
        for row, ids in enumerate(input_ids, first_row):
            # An empty prompt under a template of just {{ prompt }}, for a tokenizer with no
            # start token: a model must be given at least one token to continue.
            if not ids:
                raise MlflowException.invalid_parameter_value(
                    f"prompt at row {row} has no tokens after templating; send some text")
            if self.context_length is not None and len(ids) >= self.context_length:
                raise MlflowException.invalid_parameter_value(
                    f"prompt at row {row} is {len(ids)} tokens after templating; it fills "
                    f"{self.context_name} of {self.context_length} tokens and leaves no room to "
                    "generate. Shorten the prompt."
                )

    def _check_context(self, lengths: list[int], row_tokens: list[int], first_row: int) -> None:
        """``lengths``: each row's tokens in its context (the longest prompt's where rows are padded)."""
        row = max(range(len(lengths)), key=lambda r: lengths[r] + row_tokens[r])
        length, max_tokens = lengths[row], row_tokens[row]
        if self.context_length is not None and length + max_tokens > self.context_length:
            # A row's own length is named by its place: where rows generate alone, or it is alone.
            own = self.rows_alone or len(lengths) == 1
            which = f"the prompt at row {first_row + row}" if own else "the longest prompt"
            raise MlflowException.invalid_parameter_value(
                f"{which} is {length} tokens after templating; with max_tokens="
                f"{max_tokens} that exceeds {self.context_name} of {self.context_length} tokens. "
                "Shorten the prompt or lower max_tokens."
            )
        # Every row is padded to the longest, and its cache holds max_tokens more; a row that
        # generates alone needs the budget for itself only.
        share = self._cache_share(len(lengths))
        if share is not None and length + max_tokens > share:
            need = (f"{length + max_tokens} tokens of KV cache (its prompt's {length} tokens plus "
                    f"max_tokens={max_tokens}); rows generate one at a time" if self.rows_alone else
                    f"{len(lengths) * (length + max_tokens)} tokens of KV cache ({len(lengths)} rows of "
                    f"the longest prompt's {length} tokens plus max_tokens={max_tokens})")
            raise MlflowException.invalid_parameter_value(
                f"the request needs {need}; this model's cache budget for a batch is "
                f"{self.cache_tokens} tokens (max_cache_tokens, or what memory held at load). "
                "Send fewer rows or lower max_tokens."
            )

    def _cache_share(self, rows: int) -> int | None:
        """The KV cache tokens each row may use off the engine: all of them for a row alone."""
        if self.cache_tokens is None:
            return None
        return self.cache_tokens if self.rows_alone else self.cache_tokens // rows


class IncrementalText:
    """The text of a sequence's generated tokens, decoded as they come.

    Decoding everything generated at every step would cost time growing with the output (0.8 ms
    per sequence per step at 2,048 tokens with a small vocabulary). Only the new tokens are
    decoded, after the last tokens that added text: a tokenizer decodes a token differently at
    the start of a text (SentencePiece drops the leading space), so the new text is what the
    new tokens add to the decode of those alone. Where that decode is not a prefix of the longer
    one (a tokenizer rewriting earlier text), the whole output is decoded again. Text ending in
    an incomplete character (a byte-level token split inside it) waits for the next token.
    """

    def __init__(self) -> None:
        self.text = ""  # decoded so far
        self._window = 0  # the first token the next decode reads
        self._read = 0  # tokens decoded

    def update(self, tokenizer: Any, ids: list[int]) -> str:
        """The text of ``ids`` (the sequence's generated tokens so far), as far as it is whole."""
        text = tokenizer.decode(ids[self._window :], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return self.text
        known = tokenizer.decode(ids[self._window : self._read], skip_special_tokens=True)
        if not text.startswith(known):
            self.text = tokenizer.decode(ids, skip_special_tokens=True)
        elif len(text) > len(known):
            self.text += text[len(known) :]
            # The tokens just read start the next window only if they hold text: after a
            # skipped special token, the next word would decode as a text's first.
            self._window = self._read
        self._read = len(ids)
        return self.text
