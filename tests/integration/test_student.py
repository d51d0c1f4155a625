"""A student job against a real Redis: deltas, final answer, stop strings, cancellation, redelivery."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from redis import Redis

from gkt.jobs import DeltaEvent, ErrorEvent, FinalEvent, Guidance, GuidanceSpec, Job, SamplingParams
from gkt.models import LoadedModel, load_model
from gkt.queue import AnyEvent, Keys, SyncEventPublisher
from services.student.completion import run_job
from tests.events import job_events

KEYS = Keys("stest")
GUIDANCE = Guidance(text="There are 15 trees", token_count=4, published_at=1.0)


@pytest.fixture(scope="module")
def lm(tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(name=str(tiny_models[1]), cache_dir=tmp_path_factory.mktemp("c"))


@pytest.fixture
def publisher(redis: Redis) -> SyncEventPublisher:
    return SyncEventPublisher(redis, keys=KEYS, ttl_s=600)


def _events(redis: Redis, job: Job) -> list[AnyEvent]:
    return [event for _, event in job_events(redis, KEYS, job.id)]


def _job(**sampling: object) -> Job:
    params = SamplingParams(**{"temperature": 0.9, "max_new_tokens": 12, "seed": 3, **sampling})  # type: ignore[arg-type]
    return Job(query="How many trees?", guidance=GuidanceSpec(max_tokens=4), sampling=params)


def test_deltas_add_up_to_the_final_text_which_continues_the_guidance(
    redis: Redis, publisher: SyncEventPublisher, lm: LoadedModel
) -> None:
    job = _job()
    run_job(lm=lm, job=job, guidance=GUIDANCE, publisher=publisher, max_attempts=3)
    events = _events(redis, job)
    final = events[-1]
    assert isinstance(final, FinalEvent)
    deltas = "".join(e.text for e in events if isinstance(e, DeltaEvent))
    assert final.completion.text == GUIDANCE.text + deltas
    assert final.completion.completion_tokens <= 12
    assert final.completion.seed == 3


def test_a_redelivered_job_that_was_answered_is_not_answered_twice(
    redis: Redis, publisher: SyncEventPublisher, lm: LoadedModel
) -> None:
    job = _job()
    run_job(lm=lm, job=job, guidance=GUIDANCE, publisher=publisher, max_attempts=3)
    first = len(_events(redis, job))
    run_job(lm=lm, job=job, guidance=GUIDANCE, publisher=publisher, max_attempts=3)
    assert len(_events(redis, job)) == first
    assert sum(isinstance(e, FinalEvent) for e in _events(redis, job)) == 1


def test_a_cancelled_job_stops_after_one_token(
    redis: Redis, publisher: SyncEventPublisher, lm: LoadedModel
) -> None:
    job = _job(max_new_tokens=200, temperature=1.0)
    redis.set(KEYS.cancelled(job.id), "1")
    run_job(lm=lm, job=job, guidance=GUIDANCE, publisher=publisher, max_attempts=3)
    events = _events(redis, job)
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "CANCELLED"
    assert sum(isinstance(e, DeltaEvent) for e in events) <= 1


def test_a_job_cancelled_while_it_was_queued_is_never_generated(
    redis: Redis, publisher: SyncEventPublisher, lm: LoadedModel
) -> None:
    def first_tokens() -> float:
        return REGISTRY.get_sample_value("gkt_student_time_to_first_token_seconds_count") or 0.0

    job = _job(max_new_tokens=200)
    redis.set(KEYS.cancelled(job.id), "1")
    before = first_tokens()
    run_job(lm=lm, job=job, guidance=GUIDANCE, publisher=publisher, max_attempts=3)
    events = _events(redis, job)
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "CANCELLED"
    assert not any(isinstance(e, DeltaEvent) for e in events)
    assert first_tokens() == before  # not one token was decoded


def test_a_cancellation_heard_on_the_channel_stops_the_job_at_the_next_token_without_a_round_trip(
    redis: Redis, publisher: SyncEventPublisher, lm: LoadedModel
) -> None:
    # Only the channel carries this cancellation (no durable mark), and deltas would be synced once an
    # hour: the job can only stop early by hearing it between two tokens.
    job = _job(max_new_tokens=200, temperature=1.0)
    publisher.watch_cancellations()
    try:
        while redis.pubsub_numsub(KEYS.cancellations)[0][1] < 1:
            time.sleep(0.01)
        redis.publish(KEYS.cancellations, job.id)
        while not publisher.heard_cancel(job.id):
            time.sleep(0.01)
        run_job(
            lm=lm, job=job, guidance=GUIDANCE, publisher=publisher, max_attempts=3, stream_interval_s=3600
        )
    finally:
        publisher.stop_watching()
    events = _events(redis, job)
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "CANCELLED"
    assert not any(isinstance(e, DeltaEvent) for e in events)  # stopped after its first token


def test_a_job_past_its_attempts_fails_with_an_error(
    redis: Redis, publisher: SyncEventPublisher, lm: LoadedModel
) -> None:
    job = _job()
    redis.set(KEYS.attempts(job.id), 3)
    run_job(lm=lm, job=job, guidance=GUIDANCE, publisher=publisher, max_attempts=3)
    events = _events(redis, job)
    assert len(events) == 1 and isinstance(events[0], ErrorEvent) and events[0].code == "INTERNAL"


def test_a_prompt_and_length_beyond_the_models_context_answer_invalid_argument_naming_the_field(
    redis: Redis, publisher: SyncEventPublisher, lm: LoadedModel
) -> None:
    assert lm.context_window == 4096  # the tiny student's
    # "x " is two tokens of the tiny vocabulary: 1,500 of them leave room for a few hundred more.
    too_much = _job(max_new_tokens=2000).model_copy(update={"query": "x " * 1500})
    too_long = _job().model_copy(update={"query": "x " * 2500})
    for job, field in ((too_much, "sampling.max_new_tokens"), (too_long, "query")):
        run_job(lm=lm, job=job, guidance=GUIDANCE, publisher=publisher, max_attempts=3)
        (event,) = _events(redis, job)
        assert isinstance(event, ErrorEvent)
        assert (event.code, event.field) == ("INVALID_ARGUMENT", field)
        assert "4096 tokens" in event.message
