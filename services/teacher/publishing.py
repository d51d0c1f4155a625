"""Step 3 of the teacher: publish each generated job's guidance (and the answer of `Guide` and `full`
jobs) in one round trip, record its student task as dispatched, then send it: to the own queue of the
student that prepared its question, else to the shared queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from redis.asyncio import Redis

from gkt import leases, metrics, tracing
from gkt.answers import extract_answer
from gkt.jobs import Completion, FinalEvent, Guidance, GuidanceEvent, GuidanceMode, Job, JobKind
from gkt.keys import STUDENT_QUEUE, Keys
from gkt.queue import AnyEvent, publish_events
from services.teacher.backends.base import BackendError
from services.teacher.batching import Delivery
from services.teacher.pipeline import Generated

Dispatch = Callable[[Job, Guidance, str], None]
"""Sends a job's student task (Celery) to the queue named, blocking."""
Fail = Callable[..., Awaitable[None]]
"""Answers a job with an error event: (job, code, message, field=...)."""


async def publish_guidance(
    *, redis: Redis, keys: Keys, ttl_s: int, dispatch: Dispatch, done: Sequence[Generated], fail: Fail
) -> None:
    """Step 3 for jobs whose generation ended: publish every job's guidance (and the answer of Guide and
    FULL jobs) in one round trip, then send the student tasks: a student never starts before its
    guidance is in the job's stream. A failed generation fails its own job only."""
    outbox: list[tuple[str, AnyEvent]] = []
    students: list[tuple[Job, Guidance]] = []
    for item in done:
        job, result = item.delivery.job, item.result
        if isinstance(result, BackendError):
            metrics.TEACHER_BACKEND_ERRORS.labels(result.kind).inc()
            await fail(job, result.code, result.message, field=result.field)
            continue
        guidance = Guidance(
            text=result.text.strip(),
            token_count=result.token_count,
            finish_reason=result.finish_reason,
            batch_size=item.batch_size,
            dequeued_at=item.delivery.dequeued_at,
            teacher_seconds=item.seconds,
            published_at=time.time(),
        )
        _record_spans(item.delivery, guidance, generation_started_at=item.started_at)
        metrics.TEACHER_GUIDANCE_TOKENS.inc(guidance.token_count)
        outbox.append((job.id, GuidanceEvent(guidance=guidance)))
        if job.kind == JobKind.GUIDE or job.guidance.mode == GuidanceMode.FULL:
            outbox.append((job.id, FinalEvent(completion=_teacher_answer(job, guidance))))
            metrics.TEACHER_JOBS.labels("answered").inc()
        else:
            students.append((job, guidance))
    await publish_events(redis, keys=keys, events=outbox, ttl_s=ttl_s)
    # Recorded before they are sent: a task lost on its way is sent again by the students' sweepers.
    queues = await leases.record_dispatched(
        redis,
        keys=keys,
        payloads=[
            (
                job.id,
                leases.Orphan(job_json=job.model_dump_json(), guidance_json=guidance.model_dump_json()),
            )
            for job, guidance in students
        ],
        at=time.time(),
    )
    # Celery sends block on a round trip each: off the event loop, and side by side.
    await asyncio.gather(
        *(
            asyncio.to_thread(dispatch, job, guidance, queue or STUDENT_QUEUE)
            for (job, guidance), queue in zip(students, queues, strict=True)
        )
    )
    metrics.TEACHER_JOBS.labels("dispatched").inc(len(students))


def _teacher_answer(job: Job, guidance: Guidance) -> Completion:
    """The whole answer of a job the teacher alone answers: the guidance (Guide), or the teacher's answer (FULL)."""
    full = job.guidance.mode == GuidanceMode.FULL
    return Completion(
        text=guidance.text,
        guidance=guidance,
        answer=(extract_answer(task=job.task, text=guidance.text) or "") if full else "",
        finish_reason=guidance.finish_reason,
        seed=job.sampling.seed,
    )


def _record_spans(delivery: Delivery, guidance: Guidance, *, generation_started_at: float) -> None:
    """The job's teacher stages as spans in its trace: waiting in the queue, then its batch's generation."""
    job = delivery.job
    tracing.record_span(
        "gkt.teacher.queue_wait", traceparent=job.traceparent, start=job.enqueued_at, end=delivery.dequeued_at
    )
    if guidance.teacher_seconds:
        tracing.record_span(
            "gkt.teacher.generate",
            traceparent=job.traceparent,
            start=generation_started_at,
            end=generation_started_at + guidance.teacher_seconds,
            attributes={"gkt.batch_size": guidance.batch_size, "gkt.guidance_tokens": guidance.token_count},
        )
