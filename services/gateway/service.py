"""The gateway's work behind the RPCs: admit a job, enqueue it, follow its events to the end."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis

from gkt import metrics
from gkt.errors import DeadlineExceeded, JobFailed, ResourceExhausted
from gkt.jobs import DeltaEvent, ErrorEvent, FinalEvent, Job
from gkt.queue import STUDENT_QUEUE, AnyEvent, Keys, enqueue_job, read_events
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class GatewayService:
    """Admission, idempotency and event following; knows Redis, not gRPC."""

    def __init__(self, *, settings: GatewaySettings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.key_prefix)

    async def run(self, job: Job) -> AsyncIterator[tuple[Job, AnyEvent]]:
        """Submit `job` (or attach to the job of the same request_id) and yield its events to the last.

        If the caller goes away first (cancel, disconnect, deadline), the job is cancelled so its
        student stops generating.
        """
        job = await self.submit(job)
        finished = False
        try:
            async for event in self._follow(job):
                finished = isinstance(event, FinalEvent | ErrorEvent)
                yield job, event
        finally:
            if not finished:
                await asyncio.shield(self._cancel(job))

    async def submit(self, job: Job) -> Job:
        depth = int(await self.redis.xlen(self.keys.queries))
        metrics.GATEWAY_QUEUE_DEPTH.set(depth)
        if depth >= self.settings.gateway_max_queue_depth:
            metrics.GATEWAY_REJECTED.labels("queue_full").inc()
            raise ResourceExhausted(
                f"the queue holds {depth} jobs (limit {self.settings.gateway_max_queue_depth}); retry later"
            )
        if job.request_id:
            earlier: Any = await self.redis.set(
                self.keys.request(job.request_id),
                job.model_dump_json(),
                nx=True,
                ex=self.settings.job_ttl_s,
                get=True,
            )
            if earlier is not None:
                log.info("request_id seen before: attaching to its job", extra={"request_id": job.request_id})
                return Job.model_validate_json(earlier)
        await enqueue_job(self.redis, keys=self.keys, job=job)
        log.info(
            "job enqueued", extra={"job_id": job.id, "task": job.task.value, "mode": job.guidance.mode.value}
        )
        return job

    async def _follow(self, job: Job) -> AsyncIterator[AnyEvent]:
        after = "0-0"
        shown = 0  # characters of student text already yielded: a redelivered job repeats its deltas
        while True:
            remaining_ms = int(((job.deadline or time.time() + 3600) - time.time()) * 1000)
            if remaining_ms <= 0:
                raise DeadlineExceeded("the deadline passed before the answer was complete")
            events = await read_events(
                self.redis, keys=self.keys, job_id=job.id, after=after, block_ms=remaining_ms
            )
            for entry_id, event in events:
                after = entry_id
                if isinstance(event, DeltaEvent):
                    unseen = _unseen(event, shown)
                    if unseen is None:
                        continue
                    event, shown = unseen, unseen.offset + len(unseen.text)
                if isinstance(event, ErrorEvent):
                    raise JobFailed(event.code, event.message)
                yield event
                if isinstance(event, FinalEvent):
                    return

    async def _cancel(self, job: Job) -> None:
        try:
            await self.redis.set(self.keys.cancelled(job.id), "1", ex=self.settings.job_ttl_s)
        except Exception:  # Redis gone: the deadline stops the student instead
            log.warning("could not mark job cancelled", extra={"job_id": job.id})

    async def sample_queues(self, *, interval_s: float = 1.0) -> None:
        """Keep the queue gauges current for dashboards and autoscalers."""
        while True:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.xlen(self.keys.queries)
                    pipe.llen(STUDENT_QUEUE)
                    depth, student_depth = await pipe.execute()
                metrics.GATEWAY_QUEUE_DEPTH.set(depth)
                metrics.GATEWAY_STUDENT_QUEUE_DEPTH.set(student_depth)
            except Exception:
                log.warning("queue sampling failed", exc_info=True)
            await asyncio.sleep(interval_s)


def _unseen(event: DeltaEvent, shown: int) -> DeltaEvent | None:
    end = event.offset + len(event.text)
    if end <= shown:
        return None
    if event.offset >= shown:
        return event
    return DeltaEvent(text=event.text[shown - event.offset :], offset=shown, attempt=event.attempt)
