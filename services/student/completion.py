"""One student job: claim it, continue the teacher's guidance on the process's backend, stream, publish.

This is the logic of the Celery task, kept apart from Celery so it is tested without it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gkt import metrics, tracing
from gkt.answers import extract_answer
from gkt.engine import EngineResult
from gkt.errors import Cancelled, DeadlineExceeded, GktError, InvalidArgument, StatusCode
from gkt.jobs import Completion, DeltaEvent, ErrorEvent, FinalEvent, Guidance, Job
from gkt.leases import Claim, Lease
from gkt.prompts import STOP_SEQUENCE, student_prompt
from gkt.publisher import SyncEventPublisher
from gkt.remote.errors import BackendError
from services.student.backends.base import Stream, StudentBackend, StudentRequest
from services.student.jobbook import JobBook, LeaseLost

log = logging.getLogger(__name__)

_GRACE_S = 10.0
"""How long past a generation's deadline a job waits for the backend's own verdict."""
REDIS_AWAY = (RedisConnectionError, RedisTimeoutError)
"""Redis errors the student's client raises only after waiting out an outage (`services.student.runtime`)."""


@dataclass(frozen=True, kw_only=True)
class JobLimits:
    """How a student runs each job."""

    max_attempts: int
    time_limit_s: float
    """Longest generation of one job, whatever its own deadline."""
    stream_interval_s: float = 0.0
    """Deltas are coalesced into one Redis round trip per this many seconds (0: one per token)."""


def run_job(
    *,
    backend: StudentBackend,
    job: Job,
    guidance: Guidance,
    publisher: SyncEventPublisher,
    book: JobBook,
    limits: JobLimits,
) -> None:
    """Complete a job and publish its final event (or its error) exactly once; a redelivery of a job
    that is answered, or running on another student, does nothing."""
    claim, lease = book.claim(job, guidance)
    if claim is Claim.ANSWERED:
        log.info("job already answered; redelivery ignored", extra={"job_id": job.id})
        return
    if claim is Claim.HELD or lease is None:
        log.info("job running on another student; redelivery ignored", extra={"job_id": job.id})
        return
    try:
        _run_claimed(
            backend=backend,
            job=job,
            guidance=guidance,
            publisher=publisher,
            book=book,
            lease=lease,
            limits=limits,
        )
    except REDIS_AWAY as exc:
        # Redis stayed away longer than the client waits for it: the job is left to its lease, which a
        # student takes over once Redis is back. An error published now could reach the client after
        # Redis returned, for a job that can still be answered.
        book.abandon(lease)
        log.warning(
            "Redis unreachable; the job's lease hands it over", extra={"job_id": job.id, "error": str(exc)}
        )
        return
    except BaseException:
        book.release(lease)
        raise
    book.release(lease)


def _run_claimed(
    *,
    backend: StudentBackend,
    job: Job,
    guidance: Guidance,
    publisher: SyncEventPublisher,
    book: JobBook,
    lease: Lease,
    limits: JobLimits,
) -> None:
    if lease.attempt > limits.max_attempts:
        message = f"the student failed {lease.attempt - 1} times on this job; it was dead-lettered"
        log.error("student job dead-lettered", extra={"job_id": job.id, "attempts": lease.attempt - 1})
        publisher.dead_letter(job, reason=message)
        metrics.STUDENT_JOBS.labels("dead_lettered").inc()
        publisher.publish_final(job.id, ErrorEvent(code=StatusCode.INTERNAL, message=message))
        return
    tracing.record_span(
        "gkt.student.queue_wait", traceparent=job.traceparent, start=guidance.published_at, end=time.time()
    )
    metrics.STUDENT_BUSY.inc()
    try:
        with tracing.job_span(
            "gkt.student.generate", traceparent=job.traceparent, attributes={"gkt.attempt": lease.attempt}
        ):
            completion, last_delta = complete(
                backend=backend,
                job=job,
                guidance=guidance,
                publisher=publisher,
                book=book,
                attempt=lease.attempt,
                limits=limits,
            )
    except LeaseLost:
        log.warning("job taken over by another student; dropped here", extra={"job_id": job.id})
        return
    except REDIS_AWAY:
        raise
    except GktError as exc:
        _finish_with_error(publisher, job, exc)
        return
    except Exception as exc:  # a bug or a failed forward pass: the client hears at once, never a trace
        log.exception("student job failed unexpectedly", extra={"job_id": job.id})
        _finish_with_error(
            publisher, job, GktError(f"the student failed ({type(exc).__name__}); retry later")
        )
        return
    finally:
        metrics.STUDENT_BUSY.dec()
    publisher.publish_final(job.id, FinalEvent(completion=completion), after=last_delta)
    metrics.STUDENT_JOBS.labels("answered").inc()


def complete(
    *,
    backend: StudentBackend,
    job: Job,
    guidance: Guidance,
    publisher: SyncEventPublisher,
    book: JobBook,
    attempt: int,
    limits: JobLimits,
) -> tuple[Completion, DeltaEvent | None]:
    """Generate on the backend beside other jobs, streaming deltas; return the completion and its last
    delta, still to publish (with the final event, in one round trip).

    Deltas are coalesced: one Redis round trip (publish what is new, check the durable cancel mark) at
    most every `stream_interval_s`, the first delta at once. A cancellation heard on the channel
    (`SyncEventPublisher.watch_cancellations`) stops the job at the engine's next step, or closes its
    server stream.
    """
    started_at = time.time()
    started = time.perf_counter()
    if guidance.published_at:
        metrics.STUDENT_QUEUE_WAIT.observe(max(0.0, started_at - guidance.published_at))
    if job.expired(started_at):
        raise DeadlineExceeded("the deadline passed before a student started the job")
    if publisher.heard_cancel(job.id) or publisher.cancelled(job.id):
        raise Cancelled("the client cancelled the job before a student started it")
    prompt = student_prompt(task=job.task, query=job.query, guidance=guidance.text)
    first_part = student_prompt(task=job.task, query=job.query, guidance="") if guidance.text else ""
    params = job.sampling
    time_limit = started_at + limits.time_limit_s
    deadline = min(job.deadline, time_limit) if job.deadline is not None else time_limit
    generation = backend.submit(
        StudentRequest(
            prompt=prompt,
            sampling=params,
            stop=(STOP_SEQUENCE, *params.stop),
            strip_leading=not guidance.text,
            deadline=deadline,
            cancelled=lambda: publisher.heard_cancel(job.id) or book.lost(job.id),
            first_part=first_part,
        )
    )
    result = _stream(
        generation=generation, deadline=deadline, job=job, publisher=publisher, attempt=attempt, limits=limits
    )
    if result.item is None:
        raise AssertionError("the backend ended a generation without a result")
    outcome = result.item
    if outcome.finish_reason == "cancelled":
        if book.lost(job.id):
            raise LeaseLost(job.id)
        raise Cancelled("the client cancelled the job")
    if outcome.finish_reason == "deadline":
        if job.expired():
            raise DeadlineExceeded("the deadline passed during the student's generation")
        raise DeadlineExceeded(f"the student's time limit ({limits.time_limit_s:.0f} s) passed")
    seconds = time.perf_counter() - started
    if first_part and backend.prepares:
        metrics.STUDENT_PREPARED.labels("hit" if outcome.prepared else "miss").inc()
    metrics.STUDENT_TTFT.observe(outcome.first_token_s)
    metrics.STUDENT_JOB_DURATION.observe(seconds)
    metrics.STUDENT_TOKENS.inc(outcome.token_count)
    metrics.STUDENT_TOKENS_PER_JOB.observe(outcome.token_count)
    if seconds > 0:
        metrics.STUDENT_TOKENS_PER_SECOND.observe(outcome.token_count / seconds)
    text = guidance.text + outcome.text
    completion = Completion(
        text=text,
        guidance=guidance,
        answer=extract_answer(task=job.task, text=text) or "",
        completion_tokens=outcome.token_count,
        finish_reason=outcome.finish_reason,
        seed=params.seed,
        student_started_at=started_at,
        student_seconds=seconds,
    )
    rest = result.pending
    last_delta = DeltaEvent(text=rest, offset=result.published, attempt=attempt) if rest else None
    return completion, last_delta


@dataclass
class _Streamed:
    item: EngineResult | None = None
    pending: str = ""
    """Text made but not yet published."""
    published: int = 0
    """Characters published so far."""


def _stream(
    *,
    generation: Stream,
    deadline: float,
    job: Job,
    publisher: SyncEventPublisher,
    attempt: int,
    limits: JobLimits,
) -> _Streamed:
    """Publish the generation's deltas as they come (coalesced), until its result arrives. The backend
    ends every generation by its deadline; should it ever fail to, the job still ends soon after."""
    state = _Streamed()
    last_sync = 0.0
    give_up_at = deadline + _GRACE_S
    while state.item is None:
        if time.time() > give_up_at:
            generation.cancel()
            raise DeadlineExceeded("the student did not finish the job by its deadline")
        try:
            items = generation.collect(timeout_s=1.0)
        except Exception:  # what was made before the failure reaches the client before its error
            if state.pending:
                publisher.publish(
                    job.id, DeltaEvent(text=state.pending, offset=state.published, attempt=attempt)
                )
            raise
        for item in items:
            if isinstance(item, EngineResult):
                state.item = item
            else:
                state.pending += item
        if state.item is not None or not state.pending:
            continue
        if time.perf_counter() - last_sync >= limits.stream_interval_s:
            delta = DeltaEvent(text=state.pending, offset=state.published, attempt=attempt)
            if publisher.publish(job.id, delta, check_cancel=True):
                generation.cancel()
            state.published += len(state.pending)
            state.pending, last_sync = "", time.perf_counter()
    return state


def _finish_with_error(publisher: SyncEventPublisher, job: Job, exc: GktError) -> None:
    log.warning("student job failed", extra={"job_id": job.id, "code": exc.code})
    metrics.STUDENT_JOBS.labels("failed").inc()
    if isinstance(exc, InvalidArgument):
        event = ErrorEvent(code=exc.code, message=exc.description, field=exc.field)
    elif isinstance(exc, BackendError):
        event = ErrorEvent(code=exc.code, message=exc.message, field=exc.field)
    else:
        event = ErrorEvent(code=exc.code, message=exc.message)
    publisher.publish_final(job.id, event)
