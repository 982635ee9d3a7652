"""The generation stage, whole-batch: one ``generate`` call for a padded batch, or a stream of one
row, with transformers' ``generate``."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, TextIteratorStreamer

from templated_llm.runtime.completions import CANCELLED, Completion, cut_at_stop, held_back_at_stop
from templated_llm.runtime.params import GenerationParams
from templated_llm.runtime.streams import Stream
from templated_llm.runtime.structured import Grammar, GrammarLogitsProcessor
from templated_llm.runtime.tokens import IncrementalText


# What generation keeps of a checkpoint's generation_config.json: its token ids and how it
# caches. What decides the output comes from the plugin's defaults and each request's params
# only, so whole batches generate what the engine does.
_KEPT_GENERATION_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                           "use_cache", "cache_implementation", "cache_config", "disable_compile",
                           "compile_config")


def keep_mechanics_only(model: Any) -> dict[str, Any]:
    """Replace ``model.generation_config`` by one holding only its token ids and cache settings;
    returns the fields it set that generation then ignores (``num_beams``, ``suppress_tokens``,
    ``temperature``, ...)."""
    original = model.generation_config
    ignored = {name: value for name, value in original.to_diff_dict().items()
               if name not in _KEPT_GENERATION_FIELDS and name != "transformers_version"
               and not name.startswith("_")}
    model.generation_config = GenerationConfig(**{
        name: getattr(original, name) for name in _KEPT_GENERATION_FIELDS
        if getattr(original, name, None) is not None})
    return ignored


def _generation_config(model: Any, tokenizer: Any, params: GenerationParams) -> Any:
    config = copy.deepcopy(model.generation_config)
    # Unset (None) rather than neutral values, which transformers warns about.
    sampling = {"temperature": None, "top_p": None, "top_k": None}
    if not params.greedy:
        # top_k 0 set explicitly: left unset, transformers fills in its default of 50.
        sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
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


class _RowEnds(StoppingCriteria):
    """Ends each row at a stop string in its generated text, decoded as the engine decodes it
    (IncrementalText), and records how many tokens each row had when it ended, at an end token
    or a stop string: transformers fills a finished row's later steps with the pad token, which
    may be a token the model also generates. (transformers' own ``stop_strings`` match the
    token ids prompt included: a stop string spanning the end of the prompt, such as "\n\n"
    after a template ending in "\n", ended a row at its first token.)

    ``streamed``: each row's text (``texts``) is decoded at every token, for a stream to send;
    otherwise only where there are stop strings to look for in it.
    """

    def __init__(self, tokenizer: Any, stop: list[str], ends: set[int], rows: int, streamed: bool = False) -> None:
        self._tokenizer, self._stop, self._ends = tokenizer, stop, ends
        self._decode = bool(stop) or streamed
        self._generated: list[list[int]] = [[] for _ in range(rows)]
        self.texts = [IncrementalText() for _ in range(rows)]
        self.ended: list[int | None] = [None] * rows  # per row: its token count when it ended, if it did

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        # Called once per generated token: each row's newest is the last column.
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if self.ended[row] is not None:
                continue
            ids = self._generated[row]
            ids.append(token)
            text = self.texts[row].update(self._tokenizer, ids) if self._decode else ""
            if token in self._ends or any(s in text for s in self._stop):
                self.ended[row] = len(ids)
        return torch.tensor([n is not None for n in self.ended], device=input_ids.device)


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
    """The tokens that end a sequence: the generation config's end tokens, else the
    tokenizer's (a pad token that is no end token is a token like any other)."""
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    ids = set(eos) if isinstance(eos, list) else {eos}
    return {i for i in ids if i is not None}


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
    row_ends = _RowEnds(tokenizer, params.stop, ends, batch["input_ids"].shape[0])
    with torch.inference_mode(), _seeded(params.seed, device):
        output = model.generate(**batch, generation_config=config, stopping_criteria=[row_ends],
                                **_constrained(batch, grammar, ends))
    prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
    completions = []
    for row, tokens in enumerate(output[:, batch["input_ids"].shape[1] :].tolist()):
        # A row that ended before the others is followed by padding while they go on.
        ended = row_ends.ended[row]
        tokens = tokens if ended is None else tokens[:ended]
        completions.append(Completion(
            text=cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), params.stop),
            prompt_tokens=int(prompt_tokens[row]),
            completion_tokens=len(tokens),
            finish_reason="length" if ended is None else "stop",
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
    sends ``decoded``, the row's text as the engine decodes it (IncrementalText), which the
    stopping criteria decode once for the stop strings and this stream both: generate calls
    them on each token before handing it here.
    """

    def __init__(self, tokenizer: Any, decoded: IncrementalText) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.generated: list[int] = []
        self.text = ""  # everything sent
        self._decoded = decoded

    @property
    def tokens(self) -> int:
        return len(self.generated)

    def put(self, value: torch.Tensor) -> None:
        if self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.generated.extend(value.reshape(-1).tolist())
        self._send(self._decoded.text)

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
    row_ends = _RowEnds(tokenizer, params.stop, ends, rows=1, streamed=True)
    streamer = _Streamer(tokenizer, row_ends.texts[0])
    constrained = _constrained(batch, grammar, ends)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with lock, torch.inference_mode(), _seeded(params.seed, device):
                model.generate(**batch, generation_config=config, streamer=streamer,
                               stopping_criteria=[_Cancelled(cancelled), row_ends],
                               **constrained)
        except BaseException as exc:  # re-raised in the consumer's thread
            failure.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, name="templated-llm-stream", daemon=True)
    thread.start()
    try:
        yield from held_back_at_stop(streamer, params.stop)
        cut_short = cancelled.is_set() and streamer.tokens < params.max_tokens  # by cancel()
    finally:
        cancelled.set()
        thread.join()
    if failure:
        raise failure[0]
    yield Completion(
        text=cut_at_stop(streamer.text, params.stop),
        prompt_tokens=int(batch["attention_mask"].sum()),
        completion_tokens=streamer.tokens,
        finish_reason="stop" if row_ends.ended[0] is not None else
        CANCELLED if cut_short else "length",
    )
