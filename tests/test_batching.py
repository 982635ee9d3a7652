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


def _wait_for(condition, what: str) -> None:
    for _ in range(6000):
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"gave up waiting for {what}")


def _run_while_held(requests: list[tuple[list[list[int]], GenerationParams]], **batcher_options):
    """Submit one request, then the others while the first generates; return all results."""
    generate = _HeldGenerate()
    batcher = MicroBatcher(generate, **batcher_options)
    with ThreadPoolExecutor(len(requests)) as pool:
        first = pool.submit(batcher.submit, *requests[0])
        assert generate.started.wait(timeout=30)
        rest = [pool.submit(batcher.submit, *r) for r in requests[1:]]
        _wait_for(lambda: len(batcher._waiting) == len(requests) - 1, "every other request to queue")
        generate.release.set()
        futures = [first, *rest]
        return [f.exception() or f.result() for f in futures], generate.batches


def _batches(batches: list[tuple[list[list[int]], GenerationParams]]) -> list[tuple[str, list]]:
    """Batches as (params, rows sorted): the order of merged requests within one is free."""
    return sorted((params.model_dump_json(), sorted(ids)) for ids, params in batches)


def _merged(requests: list[tuple[list[list[int]], GenerationParams]]) -> list[tuple[str, list]]:
    """The batches a run of ``_run_while_held`` must make: the first request alone (nothing else
    waits when it starts), then one batch for every distinct params of the unseeded rest, and
    every seeded request alone."""
    first, *rest = requests
    alone = [first, *((ids, params) for ids, params in rest if params.seed is not None)]
    merged: dict[str, tuple[GenerationParams, list[list[int]]]] = {}
    for ids, params in rest:
        if params.seed is None:
            merged.setdefault(params.model_dump_json(), (params, []))[1].extend(ids)
    return _batches([*alone, *((ids, params) for params, ids in merged.values())])


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
    # Exactly the merged batches: one generate call per distinct params of the queued unseeded
    # requests, each seeded request alone. The inputs stay far below a merged batch's bound.
    assert _batches(batches) == _merged(requests)


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
    _, batches = _run_while_held(requests, max_prompts=8)
    assert sorted(len(b[0]) for b in batches) == [1, 6, 10]


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_concurrent_predicts_merge_and_get_the_results_of_serial_calls(fallback_model, monkeypatch, max_tokens):
    # The whole-batch path (engine=False): merging is the MicroBatcher's job there.
    loaded_model = fallback_model
    prompts = [[f"Name {n} rivers" + " please" * n, "Hi", f"What is {n} plus {n}?"][: 1 + n % 3]
               for n in range(8)]
    params = {"temperature": 0.0, "max_tokens": max_tokens}
    serial = [loaded_model.predict(p, params=params)["candidates"].tolist() for p in prompts]
    python_model = loaded_model.unwrap_python_model()
    model, batcher = python_model.model, python_model._batcher
    rows_per_generate, generate = [], model.generate

    def first_call_held(*args, **kwargs):
        rows_per_generate.append(kwargs["input_ids"].shape[0])
        if len(rows_per_generate) == 1:  # the first batch runs once every other request waits
            _wait_for(lambda: len(batcher._waiting) == len(prompts) - 1, "the other requests")
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", first_call_held)
    predict = lambda p: loaded_model.predict(p, params=params)["candidates"].tolist()  # noqa: E731
    with ThreadPoolExecutor(len(prompts)) as pool:
        first = pool.submit(predict, prompts[0])
        _wait_for(lambda: rows_per_generate, "the first generate call")
        rest = [pool.submit(predict, p) for p in prompts[1:]]
        concurrent = [f.result() for f in (first, *rest)]
    assert concurrent == serial
    # The seven requests that waited ran as one batch on the real model.
    assert rows_per_generate == [len(prompts[0]), sum(len(p) for p in prompts[1:])]
