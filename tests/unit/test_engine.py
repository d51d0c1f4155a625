"""The generation engine on tiny random models: continuous batching gives each row what it gets alone."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from gkt.decoding import PrefixCache, encode, few_shot_prefixes, split_point
from gkt.engine import Engine, EngineRequest, EngineResult, GenerationFailed, Sampler
from gkt.jobs import GuidanceMode, Task
from gkt.models import LoadedModel, load_model
from gkt.prompts import student_prompt, teacher_prompt

QUERIES = (
    "Where would you put a plate after washing it?\nAnswer Choices: (A) restaurant (B) cupboard (C) table",
    "Why?",
    "A much longer question about the trees in the grove, the workers who plant them, and how many "
    "trees there will be after they are done today?\nAnswer Choices: (A) 6 (B) 21 (C) 15 (D) 36 (E) 0",
    "How many apples are left?",
)
SAMPLERS = (
    Sampler(),
    Sampler(temperature=0.9, top_p=0.9, seed=3),
    Sampler(temperature=1.1, top_k=20, repetition_penalty=1.3, seed=8),
    Sampler(repetition_penalty=1.2),
)


@pytest.fixture(scope="module", params=["teacher", "student"])
def lm(
    request: pytest.FixtureRequest, tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> LoadedModel:
    """The tiny Gemma 3 (sliding window 32, far shorter than the prefix) and the tiny Llama."""
    directory = tiny_models[0] if request.param == "teacher" else tiny_models[1]
    return load_model(name=str(directory), cache_dir=tmp_path_factory.mktemp("cache"))


def _request(lm: LoadedModel, i: int, *, max_new_tokens: int = 12, **kwargs: object) -> EngineRequest:
    task = Task.CSQA if i % 2 == 0 else Task.GSM8K
    prompt = teacher_prompt(task=task, mode=GuidanceMode.CUTOFF, query=QUERIES[i % len(QUERIES)])
    return EngineRequest(
        prompt_ids=encode(lm, prompt),
        sampler=SAMPLERS[i % len(SAMPLERS)],
        max_new_tokens=max_new_tokens,
        prompt=prompt,
        **kwargs,  # type: ignore[arg-type]
    )


def _alone(lm: LoadedModel, request: EngineRequest) -> EngineResult:
    (result,) = Engine(lm, max_batch=1).generate([request])
    return result


def test_rows_joining_and_leaving_mid_flight_generate_what_they_generate_alone(lm: LoadedModel) -> None:
    """Staggered arrivals of different lengths and token limits, with and without the prefix cache."""
    for prefix_cache in (None, PrefixCache(lm, texts=few_shot_prefixes())):
        engine = Engine(lm, max_batch=3, prefix_cache=prefix_cache)
        requests = [_request(lm, i, max_new_tokens=4 + 3 * i) for i in range(6)]
        generations = []
        for request in requests:  # one arrival per step: each joins a batch already running
            generations.append(engine.submit(request))
            engine.step()
        while any(g.result is None for g in generations):
            engine.step()
            assert engine.running <= 3
        for request, generation in zip(requests, generations, strict=True):
            assert generation.result == _alone(lm, request)


def test_arrivals_in_one_step_are_prefilled_together_and_generate_what_they_generate_alone(
    lm: LoadedModel,
) -> None:
    """Prompts of different lengths and different cached prefixes (two tasks) arriving at once: one
    forward pass per prefix group, padded on the right, and every row's text is its text alone."""
    for prefix_cache in (None, PrefixCache(lm, texts=few_shot_prefixes())):
        requests = [_request(lm, i, max_new_tokens=3 + 2 * i) for i in range(6)]
        alone = [_alone(lm, r) for r in requests]
        engine = Engine(lm, max_batch=6, prefix_cache=prefix_cache)
        passes: list[int] = []
        model: Any = lm.model

        def counting(
            *args: object, forward: Any = model.forward, passes: list[int] = passes, **kwargs: object
        ) -> object:
            passes.append(1)
            return forward(*args, **kwargs)

        model.forward = counting
        try:
            generations = [engine.submit(r) for r in requests]
            engine.step()  # admits all six
            admitted = len(passes) - 1  # minus the step's decoding pass
            while any(g.result is None for g in generations):
                engine.step()
        finally:
            del model.forward
        assert admitted < len(requests)
        assert [g.result for g in generations] == alone


def test_a_finished_row_leaves_the_batch_at_once(lm: LoadedModel) -> None:
    engine = Engine(lm, max_batch=4)
    short = engine.submit(_request(lm, 1, max_new_tokens=2))
    long = engine.submit(_request(lm, 2, max_new_tokens=30))
    engine.step()
    engine.step()
    assert short.result is not None and short.result.token_count <= 2
    assert engine.running == 1
    while long.result is None:
        engine.step()
    assert long.result.finish_reason in {"length", "eos", "stop"}
    assert engine.running == 0


def test_cancel_and_deadline_stop_a_row_at_the_next_step(lm: LoadedModel) -> None:
    engine = Engine(lm, max_batch=4)
    cancelled = engine.submit(_request(lm, 0, max_new_tokens=50))
    late = engine.submit(_request(lm, 1, max_new_tokens=50, deadline=time.time() + 3600))
    other = engine.submit(_request(lm, 2, max_new_tokens=50))
    engine.step()
    cancelled.cancel()
    engine.step()
    assert cancelled.result is not None and cancelled.result.finish_reason == "cancelled"
    object.__setattr__(late.request, "deadline", time.time() - 1)
    engine.step()
    assert late.result is not None and late.result.finish_reason == "deadline"
    assert other.result is None and engine.running == 1


def test_a_waiting_request_cancelled_before_it_starts_costs_no_forward_pass(lm: LoadedModel) -> None:
    engine = Engine(lm, max_batch=1)
    first = engine.submit(_request(lm, 0, max_new_tokens=3))
    queued = engine.submit(_request(lm, 1, max_new_tokens=3, cancelled=lambda: True))
    while first.result is None or queued.result is None:
        engine.step()
    assert queued.result.finish_reason == "cancelled"
    assert queued.result.token_count == 0


def test_deltas_stream_the_text_and_a_stop_string_ends_the_row(lm: LoadedModel) -> None:
    prompt = student_prompt(task=Task.GSM8K, query="How many?", guidance="There are")
    probe = Engine(lm).generate(
        [EngineRequest(prompt_ids=encode(lm, prompt), max_new_tokens=12, prompt=prompt)]
    )[0]
    cut = next(i for i, char in enumerate(probe.text) if i >= 2 and not char.isspace())
    stop = probe.text[cut]
    engine = Engine(lm)
    generation = engine.submit(
        EngineRequest(prompt_ids=encode(lm, prompt), max_new_tokens=12, stop=(stop,), prompt=prompt)
    )
    while generation.result is None:
        engine.step()
    items = list(generation.events(timeout_s=0))
    result = items[-1]
    assert isinstance(result, EngineResult)
    assert result.finish_reason == "stop"
    assert (
        "".join(i for i in items if isinstance(i, str)) == result.text == probe.text[: probe.text.index(stop)]
    )


def test_a_background_engine_serves_requests_submitted_from_other_threads(lm: LoadedModel) -> None:
    engine = Engine(lm, max_batch=4)
    engine.start()
    try:
        requests = [_request(lm, i) for i in range(4)]
        generations = [engine.submit(r) for r in requests]
        results = [list(g.events(timeout_s=60))[-1] for g in generations]
    finally:
        engine.stop()
    for request, result in zip(requests, results, strict=True):
        assert isinstance(result, EngineResult)
        assert result.text == _alone(lm, request).text


def test_a_row_that_ends_at_its_first_token_never_joins_the_batch(lm: LoadedModel) -> None:
    engine = Engine(lm, max_batch=4)
    steps: list[int] = []
    engine._on_step = steps.append
    running = engine.submit(_request(lm, 0, max_new_tokens=6))
    engine.step()
    one = engine.submit(_request(lm, 1, max_new_tokens=1))  # done at its first token, in admission
    while running.result is None:
        engine.step()
    assert one.result is not None and one.result.token_count <= 1
    assert running.result == _alone(lm, _request(lm, 0, max_new_tokens=6))
    assert steps and set(steps) == {1}  # one row decoded per step: the finished one never took a slot


def test_longer_rows_joining_a_running_batch_widen_it_from_the_left(lm: LoadedModel) -> None:
    """A short prompt runs first; ever longer ones join it (the window grows left), then leave."""
    engine = Engine(lm, max_batch=4)
    requests = [
        EngineRequest(prompt_ids=encode(lm, prompt), max_new_tokens=6 + i, prompt=prompt)
        for i, prompt in enumerate(
            ["Q: x\\nA:", "Q: " + "a longer question " * 4 + "\\nA:", "Q: " + "word " * 60 + "\\nA:"]
        )
    ]
    generations = []
    for request in requests:
        generations.append(engine.submit(request))
        engine.step()
    while any(g.result is None for g in generations):
        engine.step()
    assert [g.result for g in generations] == [_alone(lm, r) for r in requests]


def test_a_failed_step_fails_every_row_it_carried_and_the_engine_goes_on(lm: LoadedModel) -> None:
    engine = Engine(lm, max_batch=4)
    running = engine.submit(_request(lm, 0, max_new_tokens=20))
    engine.step()
    broken = engine.submit(
        EngineRequest(prompt_ids=[10**9], max_new_tokens=4)
    )  # no such token: prefill fails
    engine.step()
    for generation in (running, broken):
        with pytest.raises(GenerationFailed):
            list(generation.events(timeout_s=1))
    assert engine.running == 0
    (after,) = engine.generate([_request(lm, 1, max_new_tokens=3)])
    assert after == _alone(lm, _request(lm, 1, max_new_tokens=3))


GUIDANCE = ("The plate goes", "Let us count: first", "Trees are planted", "Apples: 5 - 2")


def _split_requests(lm: LoadedModel, n: int, *, prepare: bool = False) -> list[EngineRequest]:
    """Student prompts split where the guidance starts; `prepare`: the requests that prepare them."""
    requests = []
    for i in range(n):
        task = Task.CSQA if i % 2 == 0 else Task.GSM8K
        first_part = student_prompt(task=task, query=QUERIES[i % len(QUERIES)], guidance="")
        prompt = first_part if prepare else student_prompt(task=task, query=QUERIES[i], guidance=GUIDANCE[i])
        prompt_ids = encode(lm, prompt)
        split = split_point(lm, first_part=first_part, prompt_ids=prompt_ids)
        assert split is not None
        requests.append(
            EngineRequest(
                prompt_ids=prompt_ids,
                sampler=SAMPLERS[i % len(SAMPLERS)],
                max_new_tokens=0 if prepare else 8,
                split_at=split,
                prompt=prompt,
            )
        )
    return requests


def test_a_prepared_prompt_generates_exactly_what_an_unprepared_one_does(lm: LoadedModel) -> None:
    """Greedy and sampled rows, arriving together: prepared first, or not at all, same tokens."""
    requests = _split_requests(lm, 4)
    cold_cache = PrefixCache(lm, texts=few_shot_prefixes())
    cold = Engine(lm, max_batch=4, prefix_cache=cold_cache).generate(requests)
    assert not any(r.prepared for r in cold)
    warm_cache = PrefixCache(lm, texts=few_shot_prefixes())
    engine = Engine(lm, max_batch=4, prefix_cache=warm_cache)
    engine.generate(_split_requests(lm, 4, prepare=True))
    assert warm_cache.prepared == 4
    warm = engine.generate(requests)
    assert all(r.prepared for r in warm)
    assert warm_cache.prepared_hits == 4
    assert [r.tokens for r in warm] == [r.tokens for r in cold]
    assert [r.text for r in warm] == [r.text for r in cold]
    assert all(r.token_count > 0 for r in warm)
    # ... and each is what it generates alone, split the same way
    assert warm == [_alone(lm, r) for r in requests]


def test_a_prepare_only_request_returns_empty_and_the_next_request_hits_its_entry(lm: LoadedModel) -> None:
    cache = PrefixCache(lm, texts=few_shot_prefixes())
    engine = Engine(lm, max_batch=4, prefix_cache=cache)
    engine.start()
    try:
        (prepare,) = _split_requests(lm, 1, prepare=True)
        items = list(engine.submit(prepare).events(timeout_s=60))
        assert items == [EngineResult(text="", token_count=0, finish_reason="length")]
        assert engine.running == 0
        assert cache.prepared == 1 and cache.prepared_hits == 0
        (request,) = _split_requests(lm, 1)
        result = list(engine.submit(request).events(timeout_s=60))[-1]
    finally:
        engine.stop()
    assert isinstance(result, EngineResult) and result.prepared
    assert cache.prepared_hits == 1
    assert result == _alone(lm, request)


def test_prepared_prompts_are_bounded_the_least_recently_used_dropped_first(lm: LoadedModel) -> None:
    cache = PrefixCache(lm, texts=few_shot_prefixes(), max_prepared=2)
    engine = Engine(lm, max_batch=4, prefix_cache=cache)
    for prepare in _split_requests(lm, 4, prepare=True):  # one after another: 0 and 1 are evicted
        engine.generate([prepare])
    assert cache.prepared == 2
    requests = _split_requests(lm, 4)
    results = [engine.generate([requests[i]])[0] for i in (3, 2, 0, 1)]
    assert [r.prepared for r in results] == [True, True, False, False]
    assert cache.prepared == 2  # 0 and 1 were kept by their own first pass, in place of 3 and 2


def test_a_question_prepared_and_asked_in_the_same_step_is_computed_once(lm: LoadedModel) -> None:
    (prepare,) = _split_requests(lm, 1, prepare=True)
    (request,) = _split_requests(lm, 1)
    cache = PrefixCache(lm, texts=few_shot_prefixes())
    cache.warm()
    engine = Engine(lm, max_batch=4, prefix_cache=cache)
    passes: list[int] = []
    model: Any = lm.model

    def counting(*args: object, forward: Any = model.forward, **kwargs: object) -> object:
        passes.append(1)
        return forward(*args, **kwargs)

    model.forward = counting
    try:
        prepared, asked = engine.submit(prepare), engine.submit(request)
        engine.step()  # admits both: one first pass, one second pass, one decoding pass
        assert len(passes) == 3
        while asked.result is None:
            engine.step()
    finally:
        del model.forward
    assert prepared.result is not None and prepared.result.token_count == 0
    assert asked.result == _alone(lm, request)
