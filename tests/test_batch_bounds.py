"""Merged batches are bounded by padded tokens, and a request merged into another's batch returns
as soon as that batch ends."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from hypothesis import given, settings
from hypothesis import strategies as st

from templated_llm.runtime.batching import MicroBatcher
from templated_llm.runtime.params import GenerationParams

GREEDY = GenerationParams(temperature=0.0, max_tokens=4)
OTHER = GenerationParams(temperature=0.0, max_tokens=5)


class _Generate:
    """A fake generate: records every batch; the batches whose first row is in ``hold`` wait
    for their event."""

    def __init__(self, hold: dict[int, threading.Event] | None = None) -> None:
        self.batches: list[tuple[list[list[int]], GenerationParams]] = []
        self.started: dict[int, threading.Event] = {k: threading.Event() for k in hold or {}}
        self.hold = hold or {}

    def __call__(self, input_ids: list[list[int]], params: GenerationParams) -> list[str]:
        self.batches.append((input_ids, params))
        first = input_ids[0][0]
        if first in self.hold:
            self.started[first].set()
            assert self.hold[first].wait(timeout=120)
        return [f"{ids[:3]}@{params.max_tokens}" for ids in input_ids]


def _wait_queued(batcher: MicroBatcher, count: int) -> None:
    while len(batcher._waiting) < count:
        threading.Event().wait(0.01)


def _padded_tokens(input_ids: list[list[int]], params: GenerationParams) -> int:
    return len(input_ids) * (max(map(len, input_ids)) + params.max_tokens)


def _run_queued_behind_one(batcher: MicroBatcher, generate: _Generate, release: threading.Event,
                           requests: list[list[list[int]]], params: GenerationParams) -> list:
    """Submit [[0]], then ``requests`` while it generates; release it; return all results."""
    with ThreadPoolExecutor(len(requests) + 1) as pool:
        first = pool.submit(batcher.submit, [[0]], params)
        assert generate.started[0].wait(timeout=60)
        rest = [pool.submit(batcher.submit, ids, params) for ids in requests]
        _wait_queued(batcher, len(requests))
        release.set()
        return [f.result(timeout=120) for f in [first, *rest]]


def test_a_long_prompt_is_not_merged_with_more_rows_than_the_token_bound_allows():
    from templated_llm.runtime.batching import MAX_MERGED_TOKENS

    release = threading.Event()
    generate = _Generate({0: release})
    batcher = MicroBatcher(generate)
    long_prompt = [[1] * 2000]
    requests = [long_prompt] + [[[i + 2]] for i in range(63)]  # 64 rows: the old bound
    _run_queued_behind_one(batcher, generate, release, requests, GREEDY)
    merged = generate.batches[1:]
    assert sum(len(ids) for ids, _ in merged) == 64
    for ids, params in merged:
        assert _padded_tokens(ids, params) <= MAX_MERGED_TOKENS
    assert len(merged) < 64  # the short prompts still merge


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.lists(st.integers(1, 60), min_size=1, max_size=3), min_size=1, max_size=8),
       max_tokens=st.integers(1, 20), bound=st.integers(1, 300))
def test_every_merged_batch_fits_the_bound_and_every_request_gets_its_results(lengths, max_tokens, bound):
    release = threading.Event()
    generate = _Generate({0: release})
    batcher = MicroBatcher(generate, max_padded_tokens=bound)
    params = GenerationParams(temperature=0.0, max_tokens=max_tokens)
    requests = [[[n + 1] * length for n, length in enumerate(rows)] for rows in lengths]
    results = _run_queued_behind_one(batcher, generate, release, requests, params)
    for ids, texts in zip([[[0]], *requests], results):
        assert texts == [f"{row[:3]}@{max_tokens}" for row in ids]
    for ids, used in generate.batches:
        alone = any(ids == request for request in [[[0]], *requests])
        assert alone or _padded_tokens(ids, used) <= bound


def test_a_request_merged_into_another_batch_returns_without_waiting_for_the_model_again():
    # Two clients each send a request, then at once another with other params. Their first
    # requests merge into one batch; the leader's next request takes the model right after it.
    # The other client's first results are ready: it must get them while that batch runs.
    first_batch, other_batch = threading.Event(), threading.Event()
    generate = _Generate({0: first_batch, 9: other_batch})
    batcher = MicroBatcher(generate)
    got = {}

    def client(name: str, first: int) -> None:
        got[name] = batcher.submit([[first]], GREEDY)
        batcher.submit([[9]], OTHER)

    with ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(batcher.submit, [[0]], GREEDY)
        assert generate.started[0].wait(timeout=60)
        clients = [pool.submit(client, "a", 1), pool.submit(client, "b", 2)]
        _wait_queued(batcher, 2)
        first_batch.set()  # the two clients' requests then merge into the next batch
        assert generate.started[9].wait(timeout=60)
        # The batch with other params runs and is held: both first results are in regardless.
        for _ in range(300):  # up to 30 s: the old code waits until other_batch is set
            if len(got) == 2:
                break
            threading.Event().wait(0.1)
        stuck = sorted({"a", "b"} - set(got))
        other_batch.set()
        blocker.result(timeout=60)
        for future in clients:
            future.result(timeout=60)
    assert stuck == [], f"client {stuck} waited behind a whole generation for results it had"
    assert sorted(got.values()) == [["[1]@4"], ["[2]@4"]]
    assert any(sorted(ids) == [[1], [2]] for ids, _ in generate.batches)  # they did merge
