"""Concurrent predict calls: merged into shared batches, with the results they get alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from templated_llm.runtime.batching import MicroBatcher
from templated_llm.runtime.params import GenerationParams

GREEDY = GenerationParams(temperature=0.0, max_tokens=4)


class _HeldGenerate:
    """A fake generate that holds its first batch until released, and records every batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[list[int]], GenerationParams]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, input_ids: list[list[int]], params: GenerationParams) -> list[str]:
        self.batches.append((input_ids, params))
        self.started.set()
        self.release.wait(timeout=30)
        if any(ids == [666] for ids in input_ids):
            raise RuntimeError("generation failed")
        return [f"{ids}@{params.max_tokens}" for ids in input_ids]


def _run_while_held(requests: list[tuple[list[list[int]], GenerationParams]]):
    """Submit one request, then the others while the first generates; return all results."""
    generate = _HeldGenerate()
    batcher = MicroBatcher(generate, max_prompts=8)
    with ThreadPoolExecutor(len(requests)) as pool:
        first = pool.submit(batcher.submit, *requests[0])
        assert generate.started.wait(timeout=30)
        rest = [pool.submit(batcher.submit, *r) for r in requests[1:]]
        while len(batcher._waiting) < len(requests) - 1:  # every other request is queued
            threading.Event().wait(0.01)
        generate.release.set()
        futures = [first, *rest]
        return [f.exception() or f.result() for f in futures], generate.batches


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=3),
                                   min_size=1, max_size=3),
                          st.sampled_from([GREEDY, GenerationParams(temperature=0.0, max_tokens=9),
                                           GenerationParams(temperature=0.7, seed=3)])),
                min_size=2, max_size=6))
def test_every_request_gets_its_own_results_whatever_the_merging(requests):
    results, batches = _run_while_held(requests)
    for (input_ids, params), texts in zip(requests, results):
        assert texts == [f"{ids}@{params.max_tokens}" for ids in input_ids]
    # No batch mixes params, a seeded request runs alone, and the queued rest merges.
    distinct_unseeded = {p.model_dump_json() for _, p in requests[1:] if p.seed is None}
    seeded = [r for r in requests if r[1].seed is not None]
    assert len(batches) <= 1 + len(distinct_unseeded) * len(requests) + len(seeded)
    assert sorted(ids for ids, p in batches if p.seed is not None) == sorted(ids for ids, _ in seeded)
    assert sum(len(ids) for ids, _ in batches) == sum(len(ids) for ids, _ in requests)


def test_waiting_requests_with_equal_params_run_as_one_batch():
    other = GenerationParams(temperature=0.0, max_tokens=9)
    requests = [([[1]], GREEDY), ([[2]], GREEDY), ([[3]], other), ([[4], [5]], GREEDY)]
    results, batches = _run_while_held(requests)
    assert results == [["[1]@4"], ["[2]@4"], ["[3]@9"], ["[4]@4", "[5]@4"]]
    assert sorted(sorted(b[0]) for b in batches) == [[[1]], [[2], [4], [5]], [[3]]]


def test_seeded_requests_always_run_alone():
    seeded = GenerationParams(temperature=0.7, seed=1)
    requests = [([[1]], GREEDY), ([[2]], seeded), ([[3]], seeded)]
    _, batches = _run_while_held(requests)
    assert sorted(b[0] for b in batches) == [[[1]], [[2]], [[3]]]


def test_a_failed_batch_fails_each_of_its_requests_and_no_other():
    requests = [([[1]], GREEDY), ([[666]], GREEDY), ([[2]], GREEDY)]
    results, _ = _run_while_held(requests)
    assert results[0] == ["[1]@4"]
    assert all(isinstance(r, RuntimeError) for r in results[1:])


def test_merged_batches_are_capped_but_a_big_request_is_never_split():
    requests = [([[1]], GREEDY), ([[i] for i in range(10)], GREEDY), ([[2]] * 3, GREEDY),
                ([[3]] * 3, GREEDY)]
    _, batches = _run_while_held(requests)
    assert sorted(len(b[0]) for b in batches) == [1, 6, 10]


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_concurrent_predicts_on_a_loaded_model_equal_serial_ones(loaded_model, max_tokens):
    prompts = [f"Name {n} rivers" + " please" * n for n in range(8)]
    params = {"temperature": 0.0, "max_tokens": max_tokens}
    serial = [loaded_model.predict([p], params=params)["candidates"].tolist() for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(
            lambda p: loaded_model.predict([p], params=params)["candidates"].tolist(), prompts))
    assert concurrent == serial
