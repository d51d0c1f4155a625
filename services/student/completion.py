"""One student job: continue the teacher's guidance with the job's own sampling, streaming deltas."""

from __future__ import annotations

import logging
import time

from gkt import metrics, tracing
from gkt.answers import extract_answer
from gkt.decoding import PrefixCache, Sampler, TextTracker, check_room, context_tokens, decode_steps, encode
from gkt.errors import Cancelled, DeadlineExceeded, GktError, InvalidArgument
from gkt.jobs import Completion, DeltaEvent, ErrorEvent, FinalEvent, Guidance, Job
from gkt.models import LoadedModel
from gkt.prompts import STOP_SEQUENCE, student_prompt
from gkt.queue import SyncEventPublisher

log = logging.getLogger(__name__)


def run_job(
    *,
    lm: LoadedModel,
    job: Job,
    guidance: Guidance,
    publisher: SyncEventPublisher,
    max_attempts: int,
    prefix_cache: PrefixCache | None = None,
    stream_interval_s: float = 0.0,
) -> None:
    """Complete a job and publish its final event (or its error); safe to run again on redelivery."""
    finished, attempt = publisher.begin(job.id)
    if finished:
        log.info("job already answered; redelivery ignored", extra={"job_id": job.id})
        return
    if attempt > max_attempts:
        message = f"the student failed {attempt - 1} times on this job; it was dead-lettered"
        log.error("student job dead-lettered", extra={"job_id": job.id, "attempts": attempt - 1})
        publisher.dead_letter(job, reason=message)
        metrics.STUDENT_JOBS.labels("dead_lettered").inc()
        publisher.publish_final(job.id, ErrorEvent(code="INTERNAL", message=message))
        return
    tracing.record_span(
        "gkt.student.queue_wait", traceparent=job.traceparent, start=guidance.published_at, end=time.time()
    )
    metrics.STUDENT_BUSY.inc()
    try:
        with tracing.job_span(
            "gkt.student.generate", traceparent=job.traceparent, attributes={"gkt.attempt": attempt}
        ):
            completion, last_delta = complete(
                lm=lm,
                job=job,
                guidance=guidance,
                publisher=publisher,
                attempt=attempt,
                prefix_cache=prefix_cache,
                stream_interval_s=stream_interval_s,
            )
    except GktError as exc:
        _finish_with_error(publisher, job, exc)
        return
    finally:
        metrics.STUDENT_BUSY.dec()
    publisher.publish_final(job.id, FinalEvent(completion=completion), after=last_delta)
    metrics.STUDENT_JOBS.labels("answered").inc()


def complete(
    *,
    lm: LoadedModel,
    job: Job,
    guidance: Guidance,
    publisher: SyncEventPublisher,
    attempt: int = 1,
    prefix_cache: PrefixCache | None = None,
    stream_interval_s: float = 0.0,
) -> tuple[Completion, DeltaEvent | None]:
    """Generate at batch size 1, checking cancellation and the deadline between tokens; return the
    completion and its last delta, still to publish (with the final event, in one round trip).

    Deltas are coalesced: one Redis round trip (publish what is new, check the durable cancel mark) at
    most every `stream_interval_s`, the first delta at once; 0 publishes after every token. A
    cancellation heard on the channel (`SyncEventPublisher.watch_cancellations`) stops the job at the
    next token without a round trip.
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
    params = job.sampling
    prompt_ids = encode(lm, prompt)
    check_room(
        lm,
        prompt_tokens=len(prompt_ids),
        max_new_tokens=params.max_new_tokens,
        length_field="sampling.max_new_tokens",
    )
    tracker = TextTracker(
        lm=lm,
        stop=(STOP_SEQUENCE, *params.stop),
        context=context_tokens(prompt_ids),
        strip_leading=not guidance.text,
    )
    sampler = Sampler(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
        seed=params.seed,
    )
    finish = "length"
    eos = lm.eos_token_ids
    pending, last_sync = "", 0.0
    steps = decode_steps(
        lm=lm, prompts=[prompt], samplers=[sampler], prefix_cache=prefix_cache, token_ids=[prompt_ids]
    )
    for (token,) in steps:
        if not tracker.tokens:
            metrics.STUDENT_TTFT.observe(time.perf_counter() - started)
        if token in eos:
            finish = "eos"
            break
        pending += tracker.push(token)
        if publisher.heard_cancel(job.id):  # no round trip: a listener thread heard it
            raise Cancelled("the client cancelled the job")
        if time.perf_counter() - last_sync >= stream_interval_s:
            if _publish_delta(
                publisher, job, pending, offset=tracker.emitted - len(pending), attempt=attempt
            ):
                raise Cancelled("the client cancelled the job")
            pending, last_sync = "", time.perf_counter()
        if job.expired():
            raise DeadlineExceeded("the deadline passed during the student's generation")
        if tracker.stopped:
            finish = "stop"
            break
        if len(tracker.tokens) >= params.max_new_tokens:
            break
    rest = pending + tracker.flush()
    last_delta = DeltaEvent(text=rest, offset=tracker.emitted - len(rest), attempt=attempt) if rest else None
    seconds = time.perf_counter() - started
    metrics.STUDENT_JOB_DURATION.observe(seconds)
    metrics.STUDENT_TOKENS.inc(len(tracker.tokens))
    metrics.STUDENT_TOKENS_PER_JOB.observe(len(tracker.tokens))
    if seconds > 0:
        metrics.STUDENT_TOKENS_PER_SECOND.observe(len(tracker.tokens) / seconds)
    text = guidance.text + tracker.text
    completion = Completion(
        text=text,
        guidance=guidance,
        answer=extract_answer(task=job.task, text=text) or "",
        completion_tokens=len(tracker.tokens),
        finish_reason=finish,
        seed=params.seed,
        student_started_at=started_at,
        student_seconds=seconds,
    )
    return completion, last_delta


def _publish_delta(publisher: SyncEventPublisher, job: Job, delta: str, *, offset: int, attempt: int) -> bool:
    """Publish a delta (if any) and return whether the client cancelled, in one round trip."""
    if not delta:
        return publisher.cancelled(job.id)
    return publisher.publish(
        job.id, DeltaEvent(text=delta, offset=offset, attempt=attempt), check_cancel=True
    )


def _finish_with_error(publisher: SyncEventPublisher, job: Job, exc: GktError) -> None:
    log.warning("student job failed", extra={"job_id": job.id, "code": exc.code})
    metrics.STUDENT_JOBS.labels("failed").inc()
    if isinstance(exc, InvalidArgument):
        event = ErrorEvent(code=exc.code, message=exc.description, field=exc.field)
    else:
        event = ErrorEvent(code=exc.code, message=exc.message)
    publisher.publish_final(job.id, event)
