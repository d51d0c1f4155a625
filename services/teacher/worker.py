"""The teacher loop: take jobs, drop what expired or was cancelled, generate guidance, publish it and
dispatch students, then ack — one batch at a time, or pipelined (`services.teacher.pipeline`).

Longer than most modules: the loop's steps, the takeover of dead teachers' jobs interleaved with them, and
the heartbeat and pace the worker publishes all use the worker's state, and read best in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor

from kombu.exceptions import OperationalError as BrokerUnavailable
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gkt import logs, metrics
from gkt.errors import StatusCode
from gkt.jobs import (
    ErrorEvent,
    GuidanceMode,
    Job,
    JobKind,
)
from gkt.keys import TEACHER_GROUP, Keys
from gkt.liveness import teacher_pace, write_heartbeat
from gkt.prompts import STOP_SEQUENCE, teacher_prompt
from gkt.queue import (
    MAX_BLOCK_MS,
    add_dead_letter,
    cancelled_jobs,
    ensure_group,
    publish_events,
    publish_final,
)
from services.teacher.backends.base import GenerationRequest, TeacherBackend
from services.teacher.batching import Delivery, claim_from_dead, claim_stale, collect_batch
from services.teacher.pipeline import NO_GUIDANCE, Generated, Pipeline
from services.teacher.publishing import Dispatch, publish_guidance
from services.teacher.settings import TeacherSettings

log = logging.getLogger(__name__)

_REDIS_RETRY_S = 1.0
_READ_MARK_TTL_S = 86_400
_TAKEOVER_CHECK_S = 2.0

Prepare = Callable[[Job], None]
"""Sends a job's prepare task to the students (Celery), blocking."""


class TeacherWorker:
    """Drains the query stream, a batch at a time or pipelined; never acks a job before publishing it."""

    def __init__(
        self,
        *,
        settings: TeacherSettings,
        redis: Redis,
        backend: TeacherBackend,
        dispatch: Dispatch,
        prepare: Prepare | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.backend = backend
        self.dispatch = dispatch
        self.prepare = prepare
        # Prepare sends have threads of their own: however many wait (a Redis outage), they never hold up
        # the student tasks' sends.
        self._prepare_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gkt-prepare")
        self._preparing: set[asyncio.Future[None]] = set()
        self.keys = Keys(settings.key_prefix)
        self._stopping = asyncio.Event()
        self._last_claim = 0.0
        self._last_takeover = 0.0
        self._batch_s: float | None = None
        """Seconds per batch (a moving average), published as this teacher's pace."""

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        await ensure_group(self.redis, keys=self.keys)
        log.info(
            "teacher serving", extra={"consumer": self.settings.teacher_name, "backend": self.backend.name}
        )
        beating = asyncio.create_task(self._keep_heartbeat(), name="gkt-teacher-heartbeat")
        try:
            await self._serve()
        finally:
            beating.cancel()
            # Prepares are advisory: those not yet sent are dropped rather than holding the exit up.
            self._prepare_pool.shutdown(wait=False, cancel_futures=True)
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
                # A stopped teacher's pace would be ignored once stale; gone at once, gateways stop counting
                # it. Its heartbeat goes too: it leaves the status at once, and jobs it still holds are taken
                # over at once.
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.hdel(self.keys.teacher_pace, self.settings.teacher_name)
                    pipe.delete(self._heartbeat_key)
                    await pipe.execute()

    async def _serve(self) -> None:
        pipeline = (
            Pipeline(worker=self, limit=self.in_flight_limit()) if self.settings.teacher_pipeline else None
        )
        try:
            while not self._stopping.is_set():
                try:
                    if pipeline is not None:
                        await pipeline.admit(stopping=self._stopping)
                        continue
                    await self.mark_read()
                    batch = await self.next_deliveries(count=self.settings.teacher_max_batch_size)
                    if batch:
                        await self.process(batch)
                except (RedisError, BrokerUnavailable) as exc:
                    if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                        # Redis restarted without persistence: the stream and its group are gone. Jobs the
                        # gateway enqueues from now on recreate the stream; the group must be made again.
                        log.warning("consumer group missing (redis restarted?); recreating it")
                        with contextlib.suppress(RedisError):
                            await ensure_group(self.redis, keys=self.keys)
                        continue
                    # Redis away, loading its file, or read-only during a failover. Unacknowledged jobs stay
                    # pending in the group: this teacher (or another) claims them later.
                    log.warning(
                        "redis unavailable; retrying", extra={"error": f"{type(exc).__name__}: {exc}"}
                    )
                    await asyncio.sleep(_REDIS_RETRY_S)
        finally:
            if pipeline is not None:
                await pipeline.drain()

    def in_flight_limit(self) -> int:
        """Jobs the pipelined teacher keeps generating at once (GKT_TEACHER_MAX_IN_FLIGHT, or the
        backend's own concurrency)."""
        return self.settings.teacher_max_in_flight or max(1, self.backend.concurrency)

    async def process(self, batch: Sequence[Delivery]) -> None:
        """Steps 2–4 for one batch: generate, publish + dispatch, acknowledge."""
        began = time.perf_counter()
        metrics.TEACHER_BATCH_SIZE.observe(len(batch))
        live = await self.screen(batch)

        # 2) generate: one backend call for every job that needs the teacher
        needs_teacher = [d for d in live if d.job.guidance.mode != GuidanceMode.NONE]
        self.prepare_students([d.job for d in needs_teacher])
        started, started_at = time.perf_counter(), time.time()
        results = await self.backend.generate_batch([self.request(d.job) for d in needs_teacher])
        teacher_seconds = time.perf_counter() - started
        if needs_teacher:
            metrics.TEACHER_GENERATION.observe(teacher_seconds)
        by_job = {d.job.id: r for d, r in zip(needs_teacher, results, strict=True)}

        # 3) publish every job's guidance, then send the student tasks
        await self.publish(
            [
                Generated(
                    delivery=d,
                    result=by_job.get(d.job.id, NO_GUIDANCE),
                    started_at=started_at,
                    seconds=teacher_seconds if d.job.id in by_job else 0.0,
                    batch_size=len(batch),
                )
                for d in live
            ]
        )

        # 4) acknowledge only now that every job of the batch has its answer or its next step, and record
        # how long a batch takes: gateways estimate the wait of a new job from it
        pace = self.record_pace(
            seconds=time.perf_counter() - began, at_once=self.settings.teacher_max_batch_size
        )
        await self.ack([d.entry_id for d in batch], pace=pace, taken=batch)

    async def screen(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Answer the jobs whose deadline passed or whose caller cancelled while they were queued; return the
        others. Also records how long each waited in the queue."""
        for delivery in deliveries:
            metrics.TEACHER_QUEUE_WAIT.observe(max(0.0, delivery.dequeued_at - delivery.job.enqueued_at))
        live = [d for d in deliveries if not d.job.expired()]
        for expired in (d for d in deliveries if d.job.expired()):
            await self._fail(
                expired.job, StatusCode.DEADLINE_EXCEEDED, "the deadline passed while the job was queued"
            )
        return await self._drop_cancelled(live)

    async def publish(self, done: Sequence[Generated]) -> None:
        """Step 3 for jobs whose generation ended (`services.teacher.publishing`)."""
        await publish_guidance(
            redis=self.redis,
            keys=self.keys,
            ttl_s=self.settings.job_ttl_s,
            dispatch=self.dispatch,
            done=done,
            fail=self._fail,
        )

    def record_pace(self, *, seconds: float, at_once: int) -> str:
        """Fold one batch's (or pipelined job's) seconds into this teacher's pace: `at_once` jobs every that
        many seconds, a moving average."""
        self._batch_s = seconds if self._batch_s is None else 0.8 * self._batch_s + 0.2 * seconds
        return teacher_pace(batch_s=self._batch_s, max_batch_size=at_once, at=time.time())

    async def _drop_cancelled(self, deliveries: list[Delivery]) -> list[Delivery]:
        """Jobs whose caller went away while they were queued end here, ungenerated (one round trip to
        check, one to answer them): a tenant that opens and cancels calls costs the teachers nothing."""
        cancelled = await cancelled_jobs(self.redis, keys=self.keys, job_ids=[d.job.id for d in deliveries])
        if not cancelled:
            return deliveries
        event = ErrorEvent(
            code=StatusCode.CANCELLED, message="the client cancelled the job before a teacher took it"
        )
        await publish_events(
            self.redis,
            keys=self.keys,
            events=[(job_id, event) for job_id in cancelled],
            ttl_s=self.settings.job_ttl_s,
        )
        metrics.TEACHER_JOBS.labels("cancelled").inc(len(cancelled))
        log.info("cancelled jobs dropped before generation", extra={"jobs": len(cancelled)})
        return [d for d in deliveries if d.job.id not in cancelled]

    def prepare_students(self, jobs: Sequence[Job]) -> None:
        """Ask a student to prefill the question of each job that will need one while the teacher writes
        its guidance: fire and forget, off the event loop. A send that fails is logged; the job goes on."""
        if self.prepare is None:
            return
        loop = asyncio.get_running_loop()
        for job in jobs:
            if job.kind != JobKind.GENERATE or job.guidance.mode in (GuidanceMode.NONE, GuidanceMode.FULL):
                continue
            sent = loop.run_in_executor(self._prepare_pool, self.prepare, job)
            self._preparing.add(sent)
            sent.add_done_callback(self._prepare_sent)

    def _prepare_sent(self, sent: asyncio.Future[None]) -> None:
        self._preparing.discard(sent)
        if not sent.cancelled() and sent.exception() is not None:
            log.warning("prepare task not sent", extra={"error": str(sent.exception())})

    def request(self, job: Job) -> GenerationRequest:
        return GenerationRequest(
            prompt=teacher_prompt(task=job.task, mode=job.guidance.mode, query=job.query),
            max_guidance_tokens=job.guidance.max_guidance_tokens,
            temperature=self.settings.teacher_temperature,
            top_p=self.settings.teacher_top_p,
            seed=job.sampling.seed,
            stop=(STOP_SEQUENCE,),
        )

    async def next_deliveries(self, *, count: int, held: Collection[str] = ()) -> list[Delivery]:
        """Up to `count` jobs: those of dead teachers first (checked every few seconds), then new ones. A
        teacher is dead when its heartbeat expired; one that hangs with its heartbeat going is passed over
        after the claim idle time. One batch at a time, new jobs are collected for up to
        GKT_TEACHER_MAX_WAIT_MS; pipelined (`held`: the entries this teacher holds, which a stale claim
        must not hand it twice), whatever has arrived is taken at once."""
        s = self.settings
        if time.monotonic() - self._last_takeover > min(_TAKEOVER_CHECK_S, s.teacher_heartbeat_ttl_s / 3):
            self._last_takeover = time.monotonic()
            claimed, broken, deliveries = await claim_from_dead(
                self.redis, keys=self.keys, consumer=s.teacher_name, count=count
            )
            await self.ack(broken)
            if claimed:
                metrics.TEACHER_CLAIMED.inc(len(claimed))
                return await self._drop_poisoned(claimed, deliveries)
        if time.monotonic() - self._last_claim > min(5.0, s.teacher_claim_idle_ms / 2000):
            self._last_claim = time.monotonic()
            claimed, broken, deliveries = await claim_stale(
                self.redis,
                keys=self.keys,
                consumer=s.teacher_name,
                min_idle_ms=s.teacher_claim_idle_ms,
                count=count,
            )
            await self.ack(broken)
            claimed = [d for d in claimed if d.entry_id not in held]
            if claimed:
                metrics.TEACHER_CLAIMED.inc(len(claimed))
                return await self._drop_poisoned(claimed, deliveries)
        pipelined = s.teacher_pipeline
        batch, broken = await collect_batch(
            self.redis,
            keys=self.keys,
            consumer=s.teacher_name,
            max_batch_size=count,
            max_wait_ms=0 if pipelined else s.teacher_max_wait_ms,
            block_ms=MAX_BLOCK_MS,
        )
        await self.ack(broken)
        if batch and not pipelined:
            metrics.TEACHER_BATCH_FILL.observe(time.time() - batch[0].dequeued_at)
        return batch

    async def _drop_poisoned(self, claimed: list[Delivery], deliveries: dict[str, int]) -> list[Delivery]:
        """Jobs that were delivered too often (they keep killing teachers) are dead-lettered."""
        keep: list[Delivery] = []
        for delivery in claimed:
            count = deliveries.get(delivery.entry_id, 1)
            if count <= self.settings.teacher_max_deliveries:
                keep.append(delivery)
                continue
            log.error("job dead-lettered", extra={**logs.job_fields(delivery.job), "deliveries": count})
            metrics.TEACHER_DEAD_LETTERED.inc()
            async with self.redis.pipeline(transaction=False) as pipe:
                add_dead_letter(pipe, keys=self.keys, job=delivery.job, reason=f"delivered {count} times")
                await pipe.execute()
            await self._fail(
                delivery.job, StatusCode.INTERNAL, f"the job failed {count} times and was dead-lettered"
            )
            await self.ack([delivery.entry_id], taken=[delivery])
        return keep

    async def _fail(self, job: Job, code: StatusCode, message: str, *, field: str = "") -> None:
        log.warning("job failed", extra={**logs.job_fields(job), "code": code})
        metrics.TEACHER_JOBS.labels("failed").inc()
        await publish_final(
            self.redis,
            keys=self.keys,
            job_id=job.id,
            event=ErrorEvent(code=code, message=message, field=field),
            ttl_s=self.settings.job_ttl_s,
        )

    async def ack(
        self, entry_ids: list[str], *, pace: str | None = None, taken: Sequence[Delivery] = ()
    ) -> None:
        """Acknowledge and delete entries, and free the tenants' queue slots of the jobs `taken` off it."""
        if not entry_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.keys.queries, TEACHER_GROUP, *entry_ids)
            pipe.xdel(self.keys.queries, *entry_ids)
            for delivery in taken:
                if delivery.tenant:
                    pipe.zrem(self.keys.queued(delivery.tenant), delivery.job.id)
            if pace is not None:
                pipe.hset(self.keys.teacher_pace, self.settings.teacher_name, pace)
                pipe.expire(self.keys.teacher_pace, _READ_MARK_TTL_S)
            await pipe.execute()

    @property
    def _heartbeat_key(self) -> str:
        return self.keys.heartbeat("teacher", self.settings.teacher_name)

    async def _keep_heartbeat(self) -> None:
        """Say this teacher is alive now and every third of the heartbeat's lifetime, from a timer: a batch
        being generated (off the event loop) or an idle wait must not make it look dead, and only a dead
        teacher's heartbeat expires (its jobs are then taken over)."""
        ttl_s = self.settings.teacher_heartbeat_ttl_s
        while True:
            try:
                await write_heartbeat(self.redis, key=self._heartbeat_key, ttl_s=ttl_s)
            except Exception as exc:  # Redis away, loading, read-only after a failover: the next beat tries
                # again; a timer that died here would let the teacher serve on while counted dead
                log.warning("heartbeat not written", extra={"error": str(exc)})
            await asyncio.sleep(self.settings.teacher_heartbeat_ttl_s / 3)

    async def mark_read(self) -> None:
        """Tell gateways a teacher is about to read the query stream (they go student-only when none has
        for a while): one write before each read, none after it."""
        await self.redis.set(self.keys.teacher_read, f"{time.time():.3f}", ex=_READ_MARK_TTL_S)
