"""The gateway's work behind the RPCs: admit a job, enqueue it, follow its events to the end.

It stays one module (about 310 lines) because it is one object's work on one Redis layout: admission, the
enqueue, following a job's events, cancelling it and sampling the queues all read the same keys, scripts
and admission settings that `GatewayService` holds; the helpers below it are small and used only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from redis.asyncio import Redis

from gkt import logs, metrics, tracing
from gkt.connections import connect_reader
from gkt.dispatch import dispatch_student, student_client
from gkt.errors import (
    DeadlineExceeded,
    InvalidArgument,
    JobFailed,
    ResourceExhausted,
    StatusCode,
    Unavailable,
)
from gkt.jobs import (
    DeltaEvent,
    ErrorEvent,
    FinalEvent,
    Guidance,
    GuidanceEvent,
    GuidanceMode,
    GuidanceSpec,
    Job,
    JobKind,
)
from gkt.keys import Keys
from gkt.liveness import teacher_capacity
from gkt.queue import AnyEvent, enqueue_job, publish_event
from services.gateway.events import EventReader
from services.gateway.limits import TAKE_SLOT
from services.gateway.request_ids import RequestIds
from services.gateway.settings import GatewaySettings
from services.gateway.tenancy import Tenant

log = logging.getLogger(__name__)

_ENDED_BY_ITS_CALLER = {StatusCode.CANCELLED, StatusCode.DEADLINE_EXCEEDED}

COMMANDS_CLIENT_NAME = "gkt-gateway"
READER_CLIENT_NAME = "gkt-gateway-reader"
"""The gateway's Redis connections by name in CLIENT LIST: its command pool and its one event reader."""


class GatewayService:
    """Admission, idempotency and event following; knows Redis, not gRPC."""

    def __init__(self, *, settings: GatewaySettings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self._celery = student_client(broker_url=settings.redis_url, key_prefix=settings.key_prefix)
        self._take_slot = redis.register_script(TAKE_SLOT)
        self.request_ids = RequestIds(redis=redis, keys=self.keys, ttl_s=settings.job_ttl_s)
        self._was_degraded = False
        self.events = EventReader(
            reader=connect_reader(settings.redis_url, client_name=READER_CLIENT_NAME),
            commands=redis,
            keys=self.keys,
        )
        self._closed = asyncio.Event()

    async def close(self) -> None:
        self._closed.set()
        await self.events.close()

    async def run(self, job: Job, *, tenant: Tenant) -> AsyncGenerator[tuple[Job, AnyEvent], None]:
        """Submit `job` (or attach to the tenant's job of the same request_id) and yield its events to the
        last.

        If the call that submitted the job goes away first (cancel, disconnect, deadline), the job is
        cancelled, so that no teacher or student spends time on it; a call that only attached to the job
        leaves it running for the caller that submitted it.
        """
        deadline = job.deadline or time.time() + self.settings.gateway_default_timeout_s
        accepted, created = await self.submit(job, tenant=tenant)
        logs.bind(**logs.job_fields(accepted))
        finished = shown = False
        try:
            while True:
                try:
                    async for event in self._follow(accepted, deadline=deadline):
                        finished = isinstance(event, FinalEvent | ErrorEvent)
                        shown = True
                        yield accepted, event
                    return
                except JobFailed as failure:
                    # The job this retry attached to ended unanswered (its own caller cancelled it, or its
                    # shorter deadline passed) while this call still has time: start it afresh, once.
                    if created or shown or failure.code not in _ENDED_BY_ITS_CALLER:
                        raise
                    accepted, created = await self.submit(job, tenant=tenant)
                    logs.bind(**logs.job_fields(accepted))
        finally:
            if created and not finished:
                await asyncio.shield(self._cancel(accepted))

    async def submit(self, job: Job, *, tenant: Tenant) -> tuple[Job, bool]:
        """Admit and enqueue `job`. Returns the job to follow and whether this call created it; False when
        the tenant sent the same request_id before (another tenant's ids are never seen)."""
        degraded = await self.degraded()
        if degraded:
            job = _student_only(job)
            depth = int(await self.redis.llen(self.keys.student_queue))
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xlen(self.keys.queries)
                pipe.hgetall(self.keys.teacher_pace)
                depth, paces = await pipe.execute()
            metrics.GATEWAY_QUEUE_DEPTH.set(depth)
            self._admit_by_wait(job, depth=depth, paces=paces)
        if depth >= self.settings.gateway_max_queue_depth:
            metrics.GATEWAY_REJECTED.labels("queue_full").inc()
            raise ResourceExhausted(
                f"the queue holds {depth} jobs (limit {self.settings.gateway_max_queue_depth}); retry later"
            )
        if tracing.enabled() and not job.traceparent:
            job = job.model_copy(update={"traceparent": tracing.current_traceparent()})
        # Students take degraded jobs straight from Celery's queue: only the teachers' queue has slots.
        holds_slot = not degraded and tenant.max_queued > 0
        if holds_slot:
            await self._take_queue_slot(job, tenant=tenant)
        if job.request_id:
            earlier = await self.request_ids.claim(job, tenant=tenant)
            if earlier is not None:
                if holds_slot:
                    await self.redis.zrem(self.keys.queued(tenant.id), job.id)
                log.info("request_id seen before: attaching to its job", extra={"request_id": job.request_id})
                return earlier, False
        if degraded:
            await self._dispatch_student(job)
        else:
            await enqueue_job(self.redis, keys=self.keys, job=job, tenant=tenant.id)
        log.info(
            "job enqueued",
            extra={
                **logs.job_fields(job),
                "task": job.task.value,
                "mode": job.guidance.mode.value,
                "degraded": degraded,
            },
        )
        return job, True

    async def _take_queue_slot(self, job: Job, *, tenant: Tenant) -> None:
        """Count the job among its tenant's jobs waiting for a teacher, or refuse it when the tenant has
        `max_queued` already. The teacher that takes the job frees the slot; a job nobody takes frees it at
        its deadline, when no teacher would generate it any more."""
        ttl_s = max(
            1.0, (job.deadline or time.time() + self.settings.gateway_default_timeout_s) - time.time()
        )
        taken = await self._take_slot(
            keys=[self.keys.queued(tenant.id)], args=[tenant.max_queued, math.ceil(ttl_s * 1000), job.id]
        )
        if not int(taken):
            metrics.GATEWAY_REJECTED.labels("key_queue_full").inc()
            raise ResourceExhausted(
                f"API key {tenant.name!r} already has {tenant.max_queued} jobs waiting for a teacher "
                "(cancelled ones included, until a teacher drops them); retry later"
            )

    def _admit_by_wait(self, job: Job, *, depth: int, paces: dict[Any, Any]) -> None:
        """Refuse a job whose deadline will pass before the teachers reach it.

        The wait is the queue ahead of the job divided by the teachers' capacity at full batches (their
        published paces); the students' time comes on top, so the estimate errs towards admitting.
        """
        if not self.settings.gateway_admit_by_wait or job.deadline is None or not depth:
            return
        now = time.time()
        capacity = teacher_capacity(paces, now=now)
        if not capacity:
            return
        wait_s = depth / capacity
        if now + wait_s > job.deadline:
            metrics.GATEWAY_REJECTED.labels("estimated_wait").inc()
            raise ResourceExhausted(
                f"the {depth} queued jobs ahead take the teachers about {wait_s:.1f} s "
                f"({capacity:.1f} jobs/s), beyond this request's deadline "
                f"({max(0.0, job.deadline - now):.1f} s); retry later or with a longer deadline"
            )

    async def degraded(self) -> bool:
        """Whether no teacher has read the query stream for `gateway_degraded_after_s` (0: never)."""
        after_s = self.settings.gateway_degraded_after_s
        if after_s <= 0:
            return False
        last_read: Any = await self.redis.get(self.keys.teacher_read)
        silent_s = time.time() - float(last_read) if last_read else math.inf
        degraded = silent_s > after_s
        if degraded != self._was_degraded:
            self._was_degraded = degraded
            if degraded:
                log.warning(
                    "no teacher is reading queries: answering student-only", extra={"silent_s": silent_s}
                )
            else:
                log.info("a teacher is reading queries again: guidance restored")
        return degraded

    async def _dispatch_student(self, job: Job) -> None:
        """Send a student-only job straight to the student queue, as a teacher would for mode NONE."""
        guidance = Guidance(text="", token_count=0, finish_reason="none", published_at=time.time())
        await publish_event(
            self.redis,
            keys=self.keys,
            job_id=job.id,
            event=GuidanceEvent(guidance=guidance),
            ttl_s=self.settings.job_ttl_s,
        )
        await asyncio.to_thread(dispatch_student, self._celery, job=job, guidance=guidance)

    async def _follow(self, job: Job, *, deadline: float) -> AsyncIterator[AnyEvent]:
        """The job's events until its last, by this call's `deadline` (a retry's may differ from its job's)."""
        shown = 0  # characters of student text already yielded: a redelivered job repeats its deltas
        async with self.events.follow(job.id) as inbox:
            while True:
                try:
                    async with asyncio.timeout(deadline - time.time()):
                        events = await inbox.next()
                except TimeoutError:
                    raise DeadlineExceeded("the deadline passed before the answer was complete") from None
                for _entry_id, event in events:
                    if isinstance(event, DeltaEvent):
                        unseen = _unseen(event, shown)
                        if unseen is None:
                            continue
                        event, shown = unseen, unseen.offset + len(unseen.text)
                    if isinstance(event, ErrorEvent):
                        if event.code == StatusCode.INVALID_ARGUMENT and event.field:
                            raise InvalidArgument(event.field, event.message)
                        raise JobFailed(event.code, event.message)
                    yield event
                    if isinstance(event, FinalEvent):
                        return

    async def _cancel(self, job: Job) -> None:
        try:
            # the value records when (fault-injection tests count the tokens generated after it)
            cancelled_at = f"{time.time():.6f}"
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(self.keys.cancelled(job.id), cancelled_at, ex=self.settings.job_ttl_s)
                pipe.publish(self.keys.cancellations, job.id)  # students hear it between two tokens
                await pipe.execute()
        except Exception:  # Redis gone: the deadline stops the student instead
            log.warning("could not mark job cancelled", extra={"job_id": job.id})

    async def sample_queues(self, *, interval_s: float = 1.0) -> None:
        """Keep the queue gauges current for dashboards and autoscalers, until `close`.

        It ends on `close` rather than on a cancel alone: a cancel that lands inside the Redis client can
        come out as one of its errors, which this loop outlives.
        """
        while not self._closed.is_set():
            try:
                await self.sample_queues_once()
            except Exception:
                log.warning("queue sampling failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), timeout=interval_s)

    async def sample_queues_once(self) -> None:
        """Set the queue gauges from one look at Redis: both queues' depths and the oldest query's age."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.keys.queries)
            pipe.llen(self.keys.student_queue)
            pipe.xrange(self.keys.queries, count=1)
            pipe.time()
            depth, student_depth, oldest, (seconds, micros) = await pipe.execute()
        metrics.GATEWAY_QUEUE_DEPTH.set(depth)
        metrics.GATEWAY_STUDENT_QUEUE_DEPTH.set(student_depth)
        metrics.GATEWAY_OLDEST_JOB_AGE.set(_age_s(oldest, now_s=seconds + micros / 1e6))


def _age_s(entries: list[Any], *, now_s: float) -> float:
    """Age of the first stream entry, from its id (milliseconds on Redis's clock, as is `now_s`)."""
    if not entries:
        return 0.0
    entry_id = entries[0][0]
    millis = int((entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")[0])
    return max(0.0, now_s - millis / 1000)


def _student_only(job: Job) -> Job:
    """The job as the student alone can answer it; guidance-only and teacher-only jobs cannot be."""
    if job.kind == JobKind.GUIDE or job.guidance.mode == GuidanceMode.FULL:
        raise Unavailable("no teacher is reading queries, so no guidance can be written; retry later")
    return job.model_copy(
        update={
            "guidance": GuidanceSpec(
                mode=GuidanceMode.NONE, max_guidance_tokens=job.guidance.max_guidance_tokens
            )
        }
    )


def _unseen(event: DeltaEvent, shown: int) -> DeltaEvent | None:
    end = event.offset + len(event.text)
    if end <= shown:
        return None
    if event.offset >= shown:
        return event
    return DeltaEvent(text=event.text[shown - event.offset :], offset=shown, attempt=event.attempt)
