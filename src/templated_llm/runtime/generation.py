"""The generation stage, whole-batch: one ``generate`` call for a padded batch, or a stream of one
row, with transformers' ``generate``."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from typing import Any

import torch
from transformers import StoppingCriteria, TextIteratorStreamer

from templated_llm.runtime.completions import Completion, cut_at_stop, held_back_at_stop
from templated_llm.runtime.params import GenerationParams
from templated_llm.runtime.streams import Stream
from templated_llm.runtime.structured import Grammar, GrammarLogitsProcessor
from templated_llm.runtime.tokens import IncrementalText


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
        **sampling,
    )
    return config


class _StopStrings(StoppingCriteria):
    """Ends each row once its generated text holds a stop string, decoded as the engine decodes
    it (IncrementalText). (transformers' own ``stop_strings`` match the token ids prompt
    included: a stop string spanning the end of the prompt, such as "\n\n" after a template
    ending in "\n", ended a row at its first token.)"""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self._tokenizer, self._stop = tokenizer, stop
        self._generated: list[list[int]] = []
        self._texts: list[IncrementalText] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        # Called once per generated token: each row's newest is the last column.
        if not self._texts:
            self._generated = [[] for _ in range(input_ids.shape[0])]
            self._texts = [IncrementalText() for _ in range(input_ids.shape[0])]
        for ids, token in zip(self._generated, input_ids[:, -1].tolist()):
            ids.append(token)
        texts = [text.update(self._tokenizer, ids) for text, ids in zip(self._texts, self._generated)]
        return torch.tensor([any(s in text for s in self._stop) for text in texts], device=input_ids.device)


def _stopping(tokenizer: Any, params: GenerationParams) -> list[StoppingCriteria]:
    return [_StopStrings(tokenizer, params.stop)] if params.stop else []


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


def end_ids(config: Any, tokenizer: Any) -> set[int]:
    """The tokens that end a sequence: the generation config's end tokens and the pad token."""
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    ids = set(eos) if isinstance(eos, list) else {eos}
    return {i for i in ids | {tokenizer.pad_token_id} if i is not None}


def _constrained(batch: dict[str, torch.Tensor], grammar: Grammar | None, ends: set[int]) -> dict[str, Any]:
    """``generate``'s arguments that hold every row to ``grammar`` (a state per row), if any."""
    if grammar is None:
        return {}
    states = [grammar.start() for _ in range(batch["input_ids"].shape[0])]
    return {"logits_processor": [GrammarLogitsProcessor(states, sorted(ends))]}


def generate_completions(
    model: Any, tokenizer: Any, batch: dict[str, torch.Tensor], params: GenerationParams, device: str,
    grammar: Grammar | None = None,
) -> list[Completion]:
    """Generate a completion for every row of an encoded batch in one ``generate`` call,
    each row held to ``grammar`` when one is given (structured output).

    The prompt is cut off by token position (not by matching text), so a completion that
    repeats the prompt, or a tokenizer that does not round-trip, cannot corrupt the result.
    """
    config = _generation_config(model, tokenizer, params)
    ends = end_ids(config, tokenizer)
    with torch.inference_mode(), _seeded(params.seed, device):
        output = model.generate(**batch, generation_config=config, stopping_criteria=_stopping(tokenizer, params),
                                **_constrained(batch, grammar, ends))
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
    completions = []
    for row, text in enumerate(texts):
        tokens = new_tokens[row].tolist()
        # A row that finished before the others is followed by padding while they go on. It
        # finished on an end token (counted), or on the token completing a stop string: then
        # the first end token is padding (the pad token is often the end token itself).
        ended = next((i for i, t in enumerate(tokens) if t in ends), None)
        cut = cut_at_stop(text, params.stop)
        if ended is not None and cut == text:
            ended += 1
        completions.append(Completion(
            text=cut,
            prompt_tokens=int(prompt_tokens[row]),
            completion_tokens=len(tokens) if ended is None else ended,
            finish_reason="stop" if ended is not None or cut != text else "length",
        ))
    return completions


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> bool:
        return self.event.is_set()


class _Streamer(TextIteratorStreamer):
    """transformers' streamer, sending text as soon as it is whole, counting the new tokens.

    transformers' own holds text back to the last space, and decodes from a fresh start after
    each line (a SentencePiece tokenizer then drops the next line's leading space); this one
    decodes as the engine does (IncrementalText).
    """

    def __init__(self, tokenizer: Any, end_ids: set[int]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.end_ids = end_ids
        self.generated: list[int] = []
        self.ended = False  # the last token is an end token
        self.text = ""  # everything sent
        self._decoded = IncrementalText()

    @property
    def tokens(self) -> int:
        return len(self.generated)

    def put(self, value: torch.Tensor) -> None:
        if self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        ids = value.reshape(-1).tolist()
        self.generated.extend(ids)
        self.ended = ids[-1] in self.end_ids
        self._send(self._decoded.update(self.tokenizer, self.generated))

    def end(self) -> None:
        # Whatever is still held back: an incomplete character at the very end.
        self._send(self.tokenizer.decode(self.generated, skip_special_tokens=True))
        self.next_tokens_are_prompt = True
        super().on_finalized_text("", stream_end=True)

    def _send(self, text: str) -> None:
        if len(text) > len(self.text):
            self.on_finalized_text(text[len(self.text) :])

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        super().on_finalized_text(text, stream_end)


def stream(
    model: Any, tokenizer: Any, batch: dict[str, torch.Tensor], params: GenerationParams,
    device: str, lock: contextlib.AbstractContextManager[Any], grammar: Grammar | None = None,
) -> Stream[str | Completion]:
    """Yield one row's generated text in chunks as it is decoded, then its :class:`Completion`.

    ``generate`` runs in a thread holding ``lock``; text that could be the start of a stop
    string is held back until it is known not to be, so the chunks join to the text
    :func:`generate_completions` returns. Closing the stream early, or its ``cancel()`` from
    any thread, stops the generation.
    """
    cancelled = threading.Event()
    chunks = _stream(model, tokenizer, batch, params, device, lock, grammar, cancelled)
    # Nothing runs before the first chunk is asked for: nothing to clean up unread.
    return Stream(chunks, lambda: None, cancel=cancelled.set)


def _stream(
    model: Any, tokenizer: Any, batch: dict[str, torch.Tensor], params: GenerationParams,
    device: str, lock: contextlib.AbstractContextManager[Any], grammar: Grammar | None,
    cancelled: threading.Event,
) -> Iterator[str | Completion]:
    config = _generation_config(model, tokenizer, params)
    ends = end_ids(config, tokenizer)
    streamer = _Streamer(tokenizer, ends)
    constrained = _constrained(batch, grammar, ends)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with lock, torch.inference_mode(), _seeded(params.seed, device):
                model.generate(**batch, generation_config=config, streamer=streamer,
                               stopping_criteria=[_Cancelled(cancelled), *_stopping(tokenizer, params)],
                               **constrained)
        except BaseException as exc:  # re-raised in the consumer's thread
            failure.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, name="templated-llm-stream", daemon=True)
    thread.start()
    try:
        yield from held_back_at_stop(streamer, params.stop)
    finally:
        cancelled.set()
        thread.join()
    if failure:
        raise failure[0]
    text = cut_at_stop(streamer.text, params.stop)
    yield Completion(
        text=text,
        prompt_tokens=int(batch["attention_mask"].sum()),
        completion_tokens=streamer.tokens,
        finish_reason="stop" if streamer.ended or text != streamer.text else "length",
    )
