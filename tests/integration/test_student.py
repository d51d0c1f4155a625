"""A student job against a real Redis: deltas, final answer, cancellation, redelivery, leases, failures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from redis import Redis

from gkt import leases
from gkt.engine import Engine, EngineRequest, Generation
from gkt.jobs import DeltaEvent, ErrorEvent, FinalEvent, Guidance, GuidanceSpec, Job, SamplingParams
from gkt.keys import Keys
from gkt.models import LoadedModel, load_model
from gkt.publisher import SyncEventPublisher
from gkt.queue import AnyEvent
from services.student.backends.local import LocalStudentBackend
from services.student.completion import JobLimits, run_job
from services.student.jobbook import JobBook
from tests.events import job_events
from tests.waiting import until

KEYS = Keys("stest")
GUIDANCE = Guidance(text="There are 15 trees", token_count=4, published_at=1.0)


@pytest.fixture(scope="module")
def lm(tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(name=str(tiny_models[1]), cache_dir=tmp_path_factory.mktemp("c"))


@pytest.fixture
def publisher(redis: Redis) -> SyncEventPublisher:
    return SyncEventPublisher(redis, keys=KEYS, ttl_s=600)


@pytest.fixture
def engine(lm: LoadedModel) -> Iterator[Engine]:
    engine = Engine(lm, max_batch=4)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture
def book(redis: Redis) -> JobBook:
    return JobBook(redis, keys=KEYS, owner="test-student", lease_s=5, ttl_s=600)


LIMITS = JobLimits(max_attempts=3, time_limit_s=60)


def _run(
    job: Job, engine: Engine, publisher: SyncEventPublisher, book: JobBook, limits: JobLimits = LIMITS
) -> None:
    run_job(
        backend=LocalStudentBackend(engine),
        job=job,
        guidance=GUIDANCE,
        publisher=publisher,
        book=book,
        limits=limits,
    )


def _events(redis: Redis, job: Job) -> list[AnyEvent]:
    return [event for _, event in job_events(redis, KEYS, job.id)]


def _job(**sampling: object) -> Job:
    params = SamplingParams(**{"temperature": 0.9, "max_new_tokens": 12, "seed": 3, **sampling})  # type: ignore[arg-type]
    return Job(query="How many trees?", guidance=GuidanceSpec(max_guidance_tokens=4), sampling=params)


def test_deltas_add_up_to_the_final_text_which_continues_the_guidance(
    redis: Redis, publisher: SyncEventPublisher, engine: Engine, book: JobBook
) -> None:
    job = _job()
    _run(job, engine, publisher, book)
    events = _events(redis, job)
    final = events[-1]
    assert isinstance(final, FinalEvent)
    deltas = "".join(e.text for e in events if isinstance(e, DeltaEvent))
    assert final.completion.text == GUIDANCE.text + deltas
    assert final.completion.completion_tokens <= 12
    assert final.completion.seed == 3


def test_a_redelivered_job_that_was_answered_is_not_answered_twice(
    redis: Redis, publisher: SyncEventPublisher, engine: Engine, book: JobBook
) -> None:
    job = _job()
    _run(job, engine, publisher, book)
    first = len(_events(redis, job))
    _run(job, engine, publisher, book)
    assert len(_events(redis, job)) == first
    assert sum(isinstance(e, FinalEvent) for e in _events(redis, job)) == 1


def test_a_job_cancelled_while_it_was_queued_is_never_generated(
    redis: Redis, publisher: SyncEventPublisher, engine: Engine, book: JobBook
) -> None:
    def first_tokens() -> float:
        return REGISTRY.get_sample_value("gkt_student_time_to_first_token_seconds_count") or 0.0

    job = _job(max_new_tokens=200)
    redis.set(KEYS.cancelled(job.id), "1")
    before = first_tokens()
    _run(job, engine, publisher, book)
    events = _events(redis, job)
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "CANCELLED"
    assert not any(isinstance(e, DeltaEvent) for e in events)
    assert first_tokens() == before  # not one token was decoded


def test_a_cancellation_heard_on_the_channel_stops_the_job_at_the_next_token_without_a_round_trip(
    redis: Redis, publisher: SyncEventPublisher, engine: Engine, book: JobBook
) -> None:
    # Only the channel carries this cancellation (no durable mark), and deltas would be synced once an
    # hour: the job can only stop early by hearing it between two tokens.
    job = _job(max_new_tokens=200, temperature=1.0)
    publisher.watch_cancellations()
    try:
        until(lambda: redis.pubsub_numsub(KEYS.cancellations)[0][1] >= 1, what="the listener to subscribe")
        redis.publish(KEYS.cancellations, job.id)
        until(lambda: publisher.heard_cancel(job.id), what="the cancellation to be heard")
        _run(job, engine, publisher, book, JobLimits(max_attempts=3, time_limit_s=60, stream_interval_s=3600))
    finally:
        publisher.stop_watching()
    events = _events(redis, job)
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "CANCELLED"
    assert not any(isinstance(e, DeltaEvent) for e in events)  # stopped after its first token


def test_a_job_past_its_attempts_fails_with_an_error(
    redis: Redis, publisher: SyncEventPublisher, engine: Engine, book: JobBook
) -> None:
    job = _job()
    redis.set(KEYS.attempts(job.id), 3)
    _run(job, engine, publisher, book)
    events = _events(redis, job)
    assert len(events) == 1 and isinstance(events[0], ErrorEvent) and events[0].code == "INTERNAL"


def test_a_prompt_and_length_beyond_the_models_context_answer_invalid_argument_naming_the_field(
    redis: Redis, publisher: SyncEventPublisher, engine: Engine, book: JobBook
) -> None:
    assert engine.lm.context_window == 4096  # the tiny student's
    # "x " is two tokens of the tiny vocabulary: 1,500 of them leave room for a few hundred more.
    too_much = _job(max_new_tokens=2000).model_copy(update={"query": "x " * 1500})
    too_long = _job().model_copy(update={"query": "x " * 2500})
    for job, field in ((too_much, "sampling.max_new_tokens"), (too_long, "query")):
        _run(job, engine, publisher, book)
        (event,) = _events(redis, job)
        assert isinstance(event, ErrorEvent)
        assert (event.code, event.field) == ("INVALID_ARGUMENT", field)
        assert "4096 tokens" in event.message


def test_jobs_running_together_stream_what_each_streams_alone(
    redis: Redis, publisher: SyncEventPublisher, engine: Engine, book: JobBook
) -> None:
    import threading

    jobs = [_job(seed=s, max_new_tokens=8 + 2 * s, temperature=0.0 if s % 2 else 0.9) for s in range(4)]
    threads = [threading.Thread(target=_run, args=(job, engine, publisher, book)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    together = [_events(redis, job)[-1] for job in jobs]
    redis.flushdb()
    alone_engine = Engine(engine.lm, max_batch=1)
    alone_engine.start()
    try:
        for job in jobs:
            _run(job, alone_engine, publisher, book)
    finally:
        alone_engine.stop()
    for job, final in zip(jobs, together, strict=True):
        alone = _events(redis, job)[-1]
        assert isinstance(final, FinalEvent) and isinstance(alone, FinalEvent)
        assert final.completion.text == alone.completion.text


def test_a_redelivery_while_another_student_holds_the_lease_does_nothing(
    redis: Redis, publisher: SyncEventPublisher, engine: Engine, book: JobBook
) -> None:
    job = _job()
    other = JobBook(redis, keys=KEYS, owner="other-student", lease_s=30, ttl_s=600)
    claim, lease = other.claim(job, GUIDANCE)
    assert claim is leases.Claim.RUN and lease is not None
    _run(job, engine, publisher, book)
    assert _events(redis, job) == []
    other.release(lease)
    _run(job, engine, publisher, book)
    assert isinstance(_events(redis, job)[-1], FinalEvent)


def test_a_dead_students_job_is_swept_once_and_its_late_renewal_learns_it_was_taken_over(
    redis: Redis,
) -> None:
    job = _job()
    dead = JobBook(redis, keys=KEYS, owner="dead-student", lease_s=2, ttl_s=600)
    _, lease = dead.claim(job, GUIDANCE)
    assert lease is not None and leases.running(redis, keys=KEYS) == 1
    assert _sweep(redis) == []  # its lease is alive
    redis.delete(KEYS.job_lease(job.id))  # as if it expired: the student stopped renewing
    orphans = _sweep(redis)
    assert [Job.model_validate_json(o.job_json).id for o in orphans] == [job.id]
    assert Guidance.model_validate_json(orphans[0].guidance_json) == GUIDANCE
    assert _sweep(redis) == []  # exactly one sweeper gets it
    taker = JobBook(redis, keys=KEYS, owner="taker", lease_s=30, ttl_s=600)
    claim, taken = taker.claim(job, GUIDANCE)
    assert claim is leases.Claim.RUN and taken is not None and taken.attempt == 2
    assert [lost.job_id for lost in dead.renew()] == [job.id]
    assert dead.lost(job.id)
    assert taker.renew() == []


def _sweep(redis: Redis, *, now: float | None = None, queue: str = "stest-queue") -> list[leases.Orphan]:
    return leases.sweep(redis, keys=KEYS, queue=queue, now=now or time.time(), redelivery_s=20, ttl_s=600)


async def test_a_dispatched_task_nobody_claimed_is_sent_again_only_once_the_queue_is_empty(
    redis: Redis, redis_url: str
) -> None:
    from redis.asyncio import Redis as AsyncRedis

    job, other = _job(), _job()
    payload = leases.Orphan(job_json=job.model_dump_json(), guidance_json=GUIDANCE.model_dump_json())
    other_payload = leases.Orphan(job_json=other.model_dump_json(), guidance_json=GUIDANCE.model_dump_json())
    aredis = AsyncRedis.from_url(redis_url)
    await leases.record_dispatched(
        aredis, keys=KEYS, payloads=[(job.id, payload), (other.id, other_payload)], at=1000.0
    )
    await aredis.aclose()
    assert _sweep(redis, now=1010.0) == []  # not yet overdue
    redis.rpush("stest-queue", "a task still waiting")
    assert _sweep(redis, now=1030.0) == []  # overdue, but it may be the task still waiting in the queue
    redis.delete("stest-queue")
    # the other job was claimed (and so is no longer waiting for a student): only the first is sent again
    book = JobBook(redis, keys=KEYS, owner="s", lease_s=30, ttl_s=600)
    book.claim(other, GUIDANCE)
    assert _sweep(redis, now=1030.0) == [payload]
    assert _sweep(redis, now=1030.0) == []


def test_an_unexpected_failure_answers_internal_at_once(
    redis: Redis, publisher: SyncEventPublisher, lm: LoadedModel, book: JobBook
) -> None:
    class Broken(Engine):
        def submit(self, request: EngineRequest) -> Generation:
            raise RuntimeError("boom")

    job = _job()
    _run(job, Broken(lm), publisher, book)
    (event,) = _events(redis, job)
    assert isinstance(event, ErrorEvent) and event.code == "INTERNAL"
    assert "RuntimeError" in event.message and "boom" not in event.message
    assert leases.running(redis, keys=KEYS) == 0


async def test_a_task_sent_to_its_preparing_students_own_queue_is_sent_again_whatever_the_shared_queue_holds(
    redis: Redis, redis_url: str
) -> None:
    """The own queue of a dead student is never emptied: its jobs cannot wait for the shared queue to be."""
    from redis.asyncio import Redis as AsyncRedis

    job, waiting = _job(), _job()
    payloads = [
        (j.id, leases.Orphan(job_json=j.model_dump_json(), guidance_json=GUIDANCE.model_dump_json()))
        for j in (job, waiting)
    ]
    own = "student.student-0@host"
    redis.set(KEYS.prepared(job.id), own)  # its question was prepared by a student now dead ...
    redis.set(KEYS.prepared(waiting.id), "student.student-1@host")
    redis.set(KEYS.queue_alive("student.student-1@host"), 1)  # ... the other's by one alive
    aredis = AsyncRedis.from_url(redis_url)
    routes = await leases.record_dispatched(aredis, keys=KEYS, payloads=payloads, at=1000.0)
    await aredis.aclose()
    assert routes == [None, "student.student-1@host"]  # a dead student's queue is not chosen
    redis.rpush("stest-queue", "a task still waiting")
    dead_queue, live_queue = KEYS.queue_list(own), KEYS.queue_list("student.student-1@host")
    redis.rpush(dead_queue, "the dead student's task")
    redis.rpush(live_queue, "the live student's task")
    try:
        assert _sweep(redis, now=1010.0) == []  # not yet overdue
        assert redis.llen(dead_queue) == 1  # nothing is deleted before its jobs are sent again
        # overdue: both are sent again although the shared queue holds a task (the second may have been
        # sent to the live student's queue, which is not the shared queue the sweeper can watch)
        assert sorted(o.job_json for o in _sweep(redis, now=1030.0)) == sorted(
            p.job_json for _, p in payloads
        )
        assert _sweep(redis, now=1030.0) == []
        # the dead student's queue is gone with its jobs sent again; the live one's is its own to drain
        assert redis.exists(dead_queue) == 0
        assert redis.lrange(live_queue, 0, -1) == [b"the live student's task"]
    finally:
        redis.delete("stest-queue", dead_queue, live_queue, KEYS.queue_alive("student.student-1@host"))
