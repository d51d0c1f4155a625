"""Students prefill a job's question while the teacher writes its guidance, with real Celery workers on
the tiny models: the job then goes to the student that prepared it, whose engine finds the question
prefilled; a job whose preparing student died is answered by another all the same.

The test plays the teacher (no teacher process): it sends the prepare task and then runs the teacher's
own publishing step, so it knows the question was prepared before the guidance is published.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gkt.dispatch import dispatch_student, prepare_student, student_client
from gkt.jobs import FinalEvent, GuidanceSpec, Job, SamplingParams, Task
from gkt.keys import STUDENT_QUEUE, Keys, own_queue
from gkt_tools import faults
from gkt_tools.processes import free_port
from gkt_tools.stack import Stack
from services.teacher.backends.base import GenerationResult
from services.teacher.batching import Delivery
from services.teacher.pipeline import Generated
from services.teacher.publishing import publish_guidance
from tests.e2e.conftest import TINY_STACK_ENV
from tests.events import job_events
from tests.waiting import until

KEYS = Keys("prep")
TIMEOUT_S = 60
RECOVERY_S = 30
GUIDANCE = "There are 15 trees"


@pytest.fixture(scope="module")
def stack(tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    teacher, student = tiny_models
    stack = Stack(
        state_dir=tmp_path_factory.mktemp("prepared"),
        env={**TINY_STACK_ENV, "GKT_TEACHER_MODEL": str(teacher), "GKT_STUDENT_MODEL": str(student),
             "GKT_KEY_PREFIX": KEYS.prefix},
        teacher=False,
        students=2,
        gateway_addr=f"127.0.0.1:{free_port()}",
        free_metrics_ports=True,
    )  # fmt: skip
    stack.start(timeout_s=180)
    yield stack
    stack.stop()


@pytest.fixture
def redis(stack: Stack) -> Iterator[Redis]:
    client = Redis.from_url(stack.redis_url or "")
    yield client
    client.close()


@pytest.fixture(scope="module")
def celery(stack: Stack) -> Celery:
    return student_client(broker_url=stack.redis_url or "", key_prefix=KEYS.prefix)


def _job(query: str) -> Job:
    return Job(
        query=query,
        task=Task.GSM8K,
        guidance=GuidanceSpec(max_guidance_tokens=4),
        sampling=SamplingParams(temperature=0.8, max_new_tokens=8, seed=5),
    )


def _prepared_by(stack: Stack, redis: Redis, celery: Celery, job: Job) -> str:
    """Send the job's prepare task; the name (in the stack) of the student that prepared it."""
    prepare_student(celery, job=job)
    until(
        lambda: redis.get(KEYS.prepared(job.id)),
        what="a student to prepare the question",
        timeout_s=TIMEOUT_S,
    )
    queue = _prepared_queue(redis, job)
    (name,) = [n for n in faults.student_names(stack) if queue.startswith(own_queue(f"{n}@"))]
    return name


def _prepared_queue(redis: Redis, job: Job) -> str:
    value: Any = redis.get(KEYS.prepared(job.id))
    return bytes(value).decode()


def _publish(stack: Stack, celery: Celery, job: Job) -> list[str]:
    """The teacher's step 3 for the job (guidance published, task recorded and sent); the queue it went to."""
    sent: list[str] = []

    def dispatch(job: Job, guidance: object, queue: str) -> None:
        sent.append(queue)
        dispatch_student(celery, job=job, guidance=guidance, queue=queue)  # type: ignore[arg-type]

    async def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the job failed: {args} {kwargs}")

    async def publish() -> None:
        aredis = AsyncRedis.from_url(stack.redis_url or "")
        try:
            await publish_guidance(
                redis=aredis,
                keys=KEYS,
                ttl_s=600,
                dispatch=dispatch,
                done=[
                    Generated(
                        delivery=Delivery(entry_id="0-1", job=job, dequeued_at=time.time()),
                        result=GenerationResult(text=GUIDANCE, token_count=4, finish_reason="length"),
                        started_at=time.time(),
                        seconds=0.1,
                        batch_size=1,
                    )
                ],
                fail=fail,
            )
        finally:
            await aredis.aclose()

    asyncio.run(publish())
    return sent


def _final(redis: Redis, job: Job, *, timeout_s: float) -> FinalEvent:
    until(lambda: redis.exists(KEYS.final(job.id)), what="the job's answer", timeout_s=timeout_s)
    final = job_events(redis, KEYS, job.id)[-1][1]
    assert isinstance(final, FinalEvent), final
    return final


def _prepared_counts(stack: Stack, name: str) -> dict[str, float]:
    """The student's gkt_student_prepared_total, by outcome."""
    port = stack.metrics_ports[name]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gkt_student_prepared_total":
                counts[sample.labels["outcome"]] = counts.get(sample.labels["outcome"], 0) + sample.value
    return counts


def test_a_job_goes_to_the_student_that_prepared_its_question_and_finds_it_prefilled(
    stack: Stack, redis: Redis, celery: Celery
) -> None:
    job = _job("How many trees are in the grove after the workers plant more?")
    preparer = _prepared_by(stack, redis, celery, job)
    (other,) = [n for n in faults.student_names(stack) if n != preparer]
    until(  # counted just after its key is written
        lambda: _prepared_counts(stack, preparer).get("prepared", 0) >= 1,
        what="the preparing student to count its prepare",
    )
    before = {n: _prepared_counts(stack, n) for n in (preparer, other)}

    assert _publish(stack, celery, job) == [_prepared_queue(redis, job)]
    final = _final(redis, job, timeout_s=TIMEOUT_S)

    assert final.completion.text.startswith(GUIDANCE)
    after = {n: _prepared_counts(stack, n) for n in (preparer, other)}
    assert after[preparer].get("hit", 0) - before[preparer].get("hit", 0) == 1
    assert after[preparer].get("miss", 0) == before[preparer].get("miss", 0)
    assert after[other] == before[other]  # the other student never saw the job


def test_a_job_whose_preparing_student_died_is_answered_by_another(
    stack: Stack, redis: Redis, celery: Celery
) -> None:
    job = _job("How many cars are in the parking lot now?")
    preparer = _prepared_by(stack, redis, celery, job)
    (other,) = [n for n in faults.student_names(stack) if n != preparer]
    try:
        stack.kill(preparer)  # the parent and its worker: nothing consumes its own queue any more
        # The dead student's queue is still chosen: its alive key outlives it by up to a lease.
        (queue,) = _publish(stack, celery, job)
        assert queue != STUDENT_QUEUE and queue.startswith(own_queue(f"{preparer}@"))
        final = _final(redis, job, timeout_s=RECOVERY_S)  # the other's sweeper sent it again
        assert final.completion.text.startswith(GUIDANCE)
        assert "sending it again" in stack.log(other)
    finally:
        stack.restart(preparer)
