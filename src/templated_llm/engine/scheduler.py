"""The engine: a scheduler thread that owns one model and advances every sequence a step at a time.

Each step of the loop:

1. sequences cancelled since the last step leave, and waiting ones take the free slots;
2. one decode forward pass over every decoding sequence (slots ``0..n-1``, contiguous), one new
   token each; those that end (an end token, a stop string, ``max_tokens``) leave;
3. up to ``prefill_chunk`` prompt tokens of the sequences still reading their prompt, in as
   few forward passes as keeps padding low; one that has read all of its prompt samples its
   first token and joins the decoding sequences. Which prompts come first is
   ``EngineConfig.prefill_order``: by default the one that would finish reading first were it
   alone (its arrival plus its unread tokens at the prefill speed measured so far).

A leaving sequence's slot is filled by moving the last decoding sequence into it (and the last
prefilling one into the hole that leaves), so the decoding slots stay ``0..n-1``. A step that
raises fails only the sequences in it; the loop goes on.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
import weakref
from collections import deque
from typing import Any

import torch

from templated_llm.engine import sampling
from templated_llm.engine.adapters import ModelAdapter
from templated_llm.engine.cache import SlotCache, StepBatch
from templated_llm.engine.config import EngineConfig, resolve
from templated_llm.engine.sequence import Sequence, SequenceState, step_failure
from templated_llm.engine.stats import EngineStats, StatsRecorder
from templated_llm.errors import EngineClosedError, EngineFullError, SequenceFailedError
from templated_llm.runtime.completions import CANCELLED
from templated_llm.runtime.generation import end_ids
from templated_llm.runtime.params import GenerationParams
from templated_llm.runtime.structured import Grammar, mask_logits
from templated_llm.runtime.tokens import context_length

_logger = logging.getLogger(__name__)

# Prefill rows share a forward pass while padding them to the longest adds at most this share.
_PREFILL_PADDING = 0.25
# The prefill speed that ranks waiting prompts: seconds over tokens of the passes read so far,
# each pass's share decaying by _PREFILL_SPEED_DECAY per later pass (a pass of many tokens weighs
# more than one of a few, whose fixed cost says little of a long prompt's), starting from a prior
# of _PRIOR_TOKENS tokens at _FIRST_SECONDS_PER_PROMPT_TOKEN. A pass counts for at most
# _SLOWEST_PASS times what the estimate expects: the first passes of a process, and on a GPU
# its first kernels, pay one-off compilation many times their reading time.
_FIRST_SECONDS_PER_PROMPT_TOKEN = 1e-3
_PRIOR_TOKENS = 256
_PREFILL_SPEED_DECAY = 0.8
_SLOWEST_PASS = 4.0


class Engine:
    """Continuous batching for one loaded model. Thread-safe: any thread may submit.

    The scheduler thread stops on :meth:`close`, when the engine is garbage-collected, or at
    interpreter exit; sequences still running then fail with ``EngineClosedError``.
    """

    def __init__(self, model: Any, tokenizer: Any, adapter: ModelAdapter,
                 config: EngineConfig | None = None, free_memory: int | None = None) -> None:
        """``free_memory``: the bytes an unbudgeted cache takes its share of (default: the
        system's available memory)."""
        self._scheduler = _Scheduler(model, tokenizer, adapter, config or EngineConfig(), free_memory)
        self.config = self._scheduler.config
        self._thread = threading.Thread(target=self._scheduler.run, name="templated-llm-engine",
                                        daemon=True)
        self._scheduler.thread = self._thread
        self._thread.start()
        # Holds the scheduler, not the engine: dropping the engine stops the thread.
        self._finalizer = weakref.finalize(self, self._scheduler.close)

    @property
    def max_num_seqs(self) -> int:
        return self._scheduler.cache.slots

    @property
    def max_seq_len(self) -> int:
        """Most tokens (prompt plus ``max_tokens``) one sequence may hold: a slot's length."""
        return self._scheduler.cache.slot_len

    def submit(self, prompt_ids: list[int], params: GenerationParams,
               grammar: Grammar | None = None) -> Sequence:
        """Queue a sequence; it starts when a slot is free. ``grammar`` holds its output to a
        response format (structured output). Raises ``ValueError`` when it cannot fit a slot and
        :class:`EngineFullError` when the waiting queue is at its limit."""
        return self._scheduler.submit(prompt_ids, params, grammar)

    def stats(self) -> EngineStats:
        return self._scheduler.stats()

    def close(self) -> None:
        """Stop the scheduler thread; unfinished sequences fail with ``EngineClosedError``."""
        self._finalizer()


class _Scheduler:
    def __init__(self, model: Any, tokenizer: Any, adapter: ModelAdapter, config: EngineConfig,
                 free_memory: int | None) -> None:
        # A copy of its own: request threads encode with the shared tokenizer, and a Rust
        # tokenizer used from two threads at once fails ("Already borrowed").
        self.tokenizer, self.adapter = copy.deepcopy(tokenizer), adapter
        self.end_ids = end_ids(model.generation_config, tokenizer)
        self.end_list = sorted(self.end_ids)
        device = str(adapter.device)
        per_token = SlotCache.bytes_per_token(adapter.layers, adapter.kv_heads, adapter.head_dim,
                                              adapter.dtype)
        shape = resolve(config, context_length(model), per_token, device, free_memory)
        self.config = dataclasses.replace(config, max_num_seqs=shape.slots,
                                          max_cache_tokens=shape.slots * shape.slot_len)
        self.cache = SlotCache(adapter.layers, shape.slots, adapter.kv_heads, shape.slot_len,
                               adapter.head_dim, adapter.dtype, adapter.device)
        # running[i] holds slot i: decoding sequences first (0..decoding-1), then prefilling.
        self.running: list[SequenceState] = []
        self.decoding = 0
        self.waiting: deque[SequenceState] = deque()
        self.condition = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.recorder = StatsRecorder()
        self.seconds_per_prompt_token = _FIRST_SECONDS_PER_PROMPT_TOKEN
        self._prefill_tokens = float(_PRIOR_TOKENS)
        self._prefill_seconds = _PRIOR_TOKENS * _FIRST_SECONDS_PER_PROMPT_TOKEN
        _logger.info(
            "engine: %d slots of %d tokens (%.0f MiB of KV cache), up to %d waiting, prefill "
            "chunk %d tokens, read %s first, %s", shape.slots, shape.slot_len,
            per_token * shape.slots * shape.slot_len / 2**20, config.max_waiting,
            config.prefill_chunk, config.prefill_order, type(adapter).__name__,
        )

    # -- any thread ---------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: GenerationParams, grammar: Grammar | None) -> Sequence:
        if not prompt_ids:
            raise ValueError("the prompt has no tokens; the engine needs at least one")
        needed = len(prompt_ids) + params.max_tokens
        if needed > self.cache.slot_len:
            raise ValueError(
                f"the prompt is {len(prompt_ids)} tokens; with max_tokens={params.max_tokens} "
                f"that is {needed}, over the {self.cache.slot_len} tokens one sequence may hold "
                "in this engine (max_cache_tokens / max_num_seqs, capped at the model's context). "
                "Shorten the prompt or lower max_tokens."
            )
        state = SequenceState(list(prompt_ids), params, sampling.generator(params, self.adapter.device),
                              grammar.start() if grammar is not None else None)
        with self.condition:
            if self.stopping:
                raise EngineClosedError("the engine is closed; load the model again")
            # Every sequence passes through the queue: those a free slot will take at the next
            # step are not waiting for one, nor are cancelled ones the next step drops.
            free = max(0, self.cache.slots - len(self.running))
            waiting = self._waiting()
            if waiting - free >= self.config.max_waiting:
                raise EngineFullError(
                    f"the engine is full: {len(self.running)} sequences running and "
                    f"{waiting} waiting, the most it queues (max_waiting="
                    f"{self.config.max_waiting}). Retry later."
                )
            self.waiting.append(state)
            self.condition.notify()
        return Sequence(state, self.wake)

    def wake(self) -> None:
        with self.condition:
            self.condition.notify()

    def _waiting(self) -> int:
        return sum(not state.cancelled.is_set() for state in self.waiting)

    def stats(self) -> EngineStats:
        # Under the lock the scheduler holds while it moves sequences between slots: a
        # sequence half-way through a move would be counted twice.
        with self.condition:
            running, waiting = list(self.running), self._waiting()
        ttft, tpot = self.recorder.summaries()
        return EngineStats(
            running=len(running), waiting=waiting, max_num_seqs=self.cache.slots,
            cache_tokens_used=sum(s.cached for s in running),
            cache_tokens_capacity=self.cache.slots * self.cache.slot_len,
            tokens_generated=self.recorder.tokens_generated,
            sequences_finished=self.recorder.finished, sequences_failed=self.recorder.failed,
            time_to_first_token=ttft, time_per_output_token=tpot,
        )

    def close(self) -> None:
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    # -- the scheduler thread -----------------------------------------------------------------

    def run(self) -> None:
        try:
            while self._admit():
                with torch.inference_mode():
                    self._step()
        finally:
            closed = EngineClosedError("the engine closed before this sequence ended")
            with self.condition:
                for state in [*self.running, *self.waiting]:
                    state.fail(closed)
                self.running.clear()
                self.waiting.clear()

    def _admit(self) -> bool:
        """Wait for work; move waiting sequences into free slots. False once closing."""
        with self.condition:
            while not self.stopping and not self.running and not self.waiting:
                self.condition.wait()
            for state in [s for s in self.waiting if s.cancelled.is_set()]:
                self.waiting.remove(state)
                state.finish(CANCELLED, self.tokenizer)
            while self.waiting and len(self.running) < self.cache.slots:
                # In prefill order: slots go first to the prompts that would be read first.
                state = min(self.waiting, key=self._prefill_rank)
                self.waiting.remove(state)
                state.slot = len(self.running)
                self.running.append(state)
            return not self.stopping

    def _step(self) -> None:
        for state in [s for s in self.running if s.cancelled.is_set()]:
            self._leave(state)
            state.finish(CANCELLED, self.tokenizer)
        if self.decoding:
            self._guarded(self.running[: self.decoding], self._decode)
        # Slots are reassigned as sequences leave, so slot order is neither age nor length.
        prefilling = sorted(self.running[self.decoding :], key=self._prefill_rank)
        for group in _prefill_groups(prefilling, self.config.prefill_chunk):
            self._guarded([state for state, _ in group], lambda g=group: self._prefill(g))

    def _prefill_rank(self, state: SequenceState) -> float:
        """When ``state`` would have read its whole prompt had it been alone: its arrival, plus
        (by default) its unread tokens at the measured speed. Among requests arriving together
        the shortest goes first; a later one overtakes an earlier one only where it reads faster
        by more than the earlier one's head start, so none is starved."""
        if self.config.prefill_order == "arrival":
            return state.submitted
        return state.submitted + (len(state.prompt_ids) - state.cached) * self.seconds_per_prompt_token

    def _guarded(self, states: list[SequenceState], run: Any) -> None:
        states = list(states)
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - fails this step's sequences, not the engine
            _logger.exception("engine step failed; failing its %d sequences", len(states))
            failure = step_failure(exc)
            failed = [state for state in states if not state.done.is_set()]
            running = [state for state in failed if state in self.running]
            # The failed pass may have written past its tokens in some layers. Every slot it
            # wrote is cleared before any leaves: leaving moves another of them into the hole,
            # and a move carries only a sequence's own tokens, leaving the rest behind.
            for state in running:
                self.cache.clear(state.slot, self.cache.slot_len)
            for state in running:
                self._leave(state)
            for state in failed:
                self.recorder.failed += 1
                state.fail(failure)

    def _decode(self) -> None:
        states = self.running[: self.decoding]
        tokens = torch.tensor([[s.generated[-1]] for s in states], device=self.adapter.device)
        batch = StepBatch(tokens, list(range(len(states))), [s.cached for s in states], [1] * len(states))
        logits = self.adapter.forward(batch, self.cache)
        for state in states:
            state.cached += 1
        self._advance(states, logits)

    def _prefill(self, group: list[tuple[SequenceState, int]]) -> None:
        width = max(take for _, take in group)
        rows = [s.prompt_ids[s.cached : s.cached + take] + [0] * (width - take) for s, take in group]
        tokens = torch.tensor(rows, device=self.adapter.device)
        batch = StepBatch(tokens, [s.slot for s, _ in group], [s.cached for s, _ in group],
                          [take for _, take in group])
        start = time.perf_counter()
        logits = self.adapter.forward(batch, self.cache)
        if logits.device.type != "cpu":  # kernels run asynchronously: time them, not their launch
            torch.accelerator.synchronize(logits.device)
        self._measured_prefill(time.perf_counter() - start, sum(take for _, take in group))
        for state, take in group:
            state.cached += take
        # Only once every row counts its new chunk: a promotion moves other rows' slots.
        done = [row for row, (state, _) in enumerate(group) if not state.prefilling]
        for row in done:
            self._promote(group[row][0])
        if done:
            self._advance([group[row][0] for row in done], logits[done])

    def _measured_prefill(self, seconds: float, tokens: int) -> None:
        """Fold a prefill pass of ``tokens`` tokens that took ``seconds`` into the speed estimate."""
        expected = tokens * self.seconds_per_prompt_token
        self._prefill_seconds = self._prefill_seconds * _PREFILL_SPEED_DECAY + min(seconds, _SLOWEST_PASS * expected)
        self._prefill_tokens = self._prefill_tokens * _PREFILL_SPEED_DECAY + tokens
        self.seconds_per_prompt_token = self._prefill_seconds / self._prefill_tokens

    def _advance(self, states: list[SequenceState], logits: torch.Tensor) -> None:
        """Sample each sequence's next token; end those that are done."""
        states, logits = self._drop_non_finite(states, logits)
        for row, state in enumerate(states):
            if state.grammar is not None:  # structured output: only the tokens it allows
                mask_logits(logits[row], state.grammar, self.end_list)
        tokens, failed = sampling.next_tokens(logits, [s.params for s in states], [s.seen for s in states],
                                              [s.generator for s in states])
        if failed:
            states, tokens = self._fail_rows(states, tokens, failed)
        now = time.perf_counter()
        self.recorder.tokens_generated += len(states)
        ended = []
        for state, token in zip(states, tokens):
            state.generated.append(token)
            if state.grammar is not None and not state.grammar.is_done():
                state.grammar.advance(token)
            if state.first_token_at is None:
                state.first_token_at = now
                self.recorder.first_token(now - state.submitted)
            if state.params.stop or state.streaming:
                state.decode(self.tokenizer)
            if token in self.end_ids or (state.params.stop and state.stopped_at_string()):
                ended.append((state, "stop"))
            elif len(state.generated) >= state.params.max_tokens:
                ended.append((state, "length"))
        for state, reason in ended:
            self._leave(state)
            self.recorder.finished_sequence(len(state.generated), now - state.first_token_at)
            state.finish(reason, self.tokenizer)

    def _fail_rows(self, states: list[SequenceState], tokens: list[int], failed: dict[int, Exception]
                   ) -> tuple[list[SequenceState], list[int]]:
        """Fail the sequences whose sampling raised; the others go on with their tokens."""
        for row, exc in failed.items():
            _logger.error("sampling failed for one sequence; failing it alone", exc_info=exc)
            self._fail_alone(states[row], step_failure(exc))
        kept = [row for row in range(len(states)) if row not in failed]
        return [states[row] for row in kept], [tokens[row] for row in kept]

    def _drop_non_finite(self, states: list[SequenceState], logits: torch.Tensor
                         ) -> tuple[list[SequenceState], torch.Tensor]:
        """Fail the sequences whose logits hold NaN or +inf (an overflow, as float16 can give):
        greedy decoding would return garbage and sampling would fail the whole step. Leaving
        zeroes their slots: the values that caused it do not reach the next sequence there."""
        # One pass: a row's max is NaN or +inf where any of its logits is (or all are -inf).
        broken = (~logits.amax(dim=-1).isfinite()).tolist()
        if not any(broken):
            return states, logits
        hint = ("float16 overflows where bfloat16 and float32 do not: load the model with "
                "dtype='bfloat16' or 'float32'" if self.adapter.dtype == torch.float16 else
                f"in {self.adapter.dtype} that points at the model's weights or code")
        for state, bad in zip(states, broken):
            if bad:
                self._fail_alone(state, SequenceFailedError(
                    f"the model computed non-finite logits (NaN or inf) for this sequence after "
                    f"{len(state.generated)} generated tokens; {hint}. Other sequences were not "
                    "affected"))
        kept = [row for row, bad in enumerate(broken) if not bad]
        return [states[row] for row in kept], logits[kept]

    def _fail_alone(self, state: SequenceState, error: SequenceFailedError) -> None:
        """Fail one running sequence mid-step, its slot freed; the step goes on for the others."""
        self._leave(state)
        self.recorder.failed += 1
        state.fail(error)

    # -- slots ----------------------------------------------------------------------------------

    def _leave(self, state: SequenceState) -> None:
        """Free ``state``'s slot, keeping decoding slots 0..n-1 and prefilling ones after them.

        A slot holds zeros past its sequence's tokens, free slots none but zeros: a sequence's
        masked keys are another's leftovers otherwise, and an overflow's NaN there would reach
        its output (0 * NaN). Leaving and moving clear what they leave behind."""
        with self.condition:  # stats() reads the slots whole
            hole = state.slot
            self.cache.clear(hole, state.cached)
            if hole < self.decoding:
                self.decoding -= 1
                if hole != self.decoding:
                    self._relocate(self.running[self.decoding], hole)
                hole = self.decoding
            last = len(self.running) - 1
            if hole != last:
                self._relocate(self.running[last], hole)
            self.running.pop()
            state.slot = -1

    def _relocate(self, state: SequenceState, slot: int) -> None:
        self.cache.move(state.slot, slot, state.cached)
        self.running[slot] = state
        state.slot = slot

    def _promote(self, state: SequenceState) -> None:
        """A sequence that has read its prompt takes the first prefilling slot and decodes."""
        first = self.decoding
        if state.slot != first:
            other = self.running[first]
            self.cache.swap(state.slot, state.cached, first, other.cached)
            with self.condition:
                self.running[state.slot], self.running[first] = other, state
                other.slot, state.slot = state.slot, first
        self.decoding += 1


def _prefill_groups(prefilling: list[SequenceState], budget: int) -> list[list[tuple[SequenceState, int]]]:
    """This step's prompt chunks, in ``prefilling``'s order, up to ``budget`` tokens in all, grouped
    into forward passes of similar chunk lengths (padding to the longest in each stays low)."""
    chunks = []
    for state in prefilling:
        if budget <= 0:
            break
        take = min(len(state.prompt_ids) - state.cached, budget)
        chunks.append((state, take))
        budget -= take
    groups: list[list[tuple[SequenceState, int]]] = []
    for chunk in sorted(chunks, key=lambda c: -c[1]):
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * group[0][1] <= (1 + _PREFILL_PADDING) * (
                sum(t for _, t in group) + chunk[1]):
            group.append(chunk)
        else:
            groups.append([chunk])
    return groups
