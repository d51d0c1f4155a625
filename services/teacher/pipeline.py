"""The pipelined teacher: up to N jobs generating at once, a new one admitted as each ends, each job's
guidance published the moment it is ready and its entry acknowledged only after that.

A server that batches continuously (TGI, vLLM, the local engine) then always has work: no batch waits
for its slowest row, and the server does not idle while a batch is published and the next collected.
The steps of each job are those of a batch: 1) admit (read, drop what expired or was cancelled),
2) generate, 3) publish guidance and dispatch its student, 4) acknowledge.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gkt import metrics
from gkt.errors import StatusCode
from gkt.jobs import GuidanceMode, Job
from gkt.queue import MAX_BLOCK_MS
from services.teacher.backends.base import BackendError, GenerationRequest, GenerationResult, TeacherBackend
from services.teacher.batching import Delivery

log = logging.getLogger(__name__)

NO_GUIDANCE = GenerationResult(text="", token_count=0, finish_reason="none")
"""The result of a job that needs no teacher (guidance mode `none`)."""


@dataclass(frozen=True, kw_only=True)
class Generated:
    """One job whose generation ended, ready to publish."""

    delivery: Delivery
    result: GenerationResult | BackendError
    started_at: float
    """Epoch seconds its generation began."""
    seconds: float
    """Teacher time of its generation (0 when it needed none)."""
    batch_size: int
    """Jobs generating beside it: its batch, or those in flight when it was admitted (itself included)."""


class Steps(Protocol):
    """What the pipeline asks of its teacher (`services.teacher.worker.TeacherWorker`)."""

    backend: TeacherBackend

    def request(self, job: Job) -> GenerationRequest: ...

    def prepare_students(self, jobs: Sequence[Job]) -> None: ...

    async def mark_read(self) -> None: ...

    async def next_deliveries(self, *, count: int, held: Collection[str] = ()) -> list[Delivery]: ...

    async def screen(self, deliveries: Sequence[Delivery]) -> list[Delivery]: ...

    async def publish(self, done: Sequence[Generated]) -> None: ...

    def record_pace(self, *, seconds: float, at_once: int) -> str: ...

    async def ack(
        self, entry_ids: list[str], *, pace: str | None = None, taken: Sequence[Delivery] = ()
    ) -> None: ...


class Pipeline:
    """Keeps `limit` jobs generating: the reader keeps up to `limit` more read ahead, so a job that ends
    is replaced at once, without a round trip to Redis; one task per job generating; one publisher for
    whatever is ready."""

    def __init__(self, *, worker: Steps, limit: int) -> None:
        self.worker = worker
        self.limit = limit
        self.generating: dict[str, asyncio.Task[None]] = {}
        """Entry id → the task generating it."""
        self.held: set[str] = set()
        """Entries read and not yet acknowledged (read ahead, generating, ready, or being published)."""
        self._ahead: collections.deque[Delivery] = collections.deque()
        self._ready: list[tuple[Generated, float]] = []
        self._changed = asyncio.Event()
        """Set whenever a job starts, ends or is published: what the reader and the starter wait for."""
        self._ready_now = asyncio.Event()
        self._idle = asyncio.Event()
        """Set each time the publisher has published everything ready."""
        self._tasks: list[asyncio.Task[None]] = []

    async def admit(self, *, stopping: asyncio.Event) -> None:
        """Step 1, once: wait until fewer than `limit` jobs are read ahead, then read up to that many."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._start_read(), name="gkt-teacher-starter"),
                asyncio.create_task(self._publish_ready(), name="gkt-teacher-publisher"),
            ]
        # Jobs ready but not yet published count too: a Redis that cannot take them stops admission.
        while (room := min(self.limit - len(self._ahead), 2 * self.limit - len(self.held))) <= 0:
            await self._wait_for_change()
            if stopping.is_set():
                return
        await self.worker.mark_read()
        deliveries = await self.worker.next_deliveries(count=room, held=self.held)
        if not deliveries:
            return
        self.held.update(d.entry_id for d in deliveries)
        try:
            live = await self.worker.screen(deliveries)
        except BaseException:
            self.held.difference_update(d.entry_id for d in deliveries)
            raise
        await self._ack([d for d in deliveries if d not in live])
        self._ahead.extend(live)
        self._changed.set()

    async def drain(self) -> None:
        """Let every job read finish and be published (a stopping teacher keeps its promises)."""
        while self._ahead or self.generating:
            await self._wait_for_change()
        while self._tasks and (self._ready or self._ready_now.is_set()):
            self._idle.clear()
            await self._idle.wait()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _start_read(self) -> None:
        """Start each job read ahead as soon as fewer than `limit` generate."""
        while True:
            while not self._ahead or len(self.generating) >= self.limit:
                await self._wait_for_change()
            # A job's pace is timed from here, not from its read: gateways estimate the teacher's capacity
            # as jobs in flight / seconds per job, and the wait read ahead is not generation.
            self._start(self._ahead.popleft(), began=time.perf_counter())
            self._changed.set()

    async def _wait_for_change(self) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(MAX_BLOCK_MS / 1000):
                await self._changed.wait()

    def _start(self, delivery: Delivery, *, began: float) -> None:
        batch_size = len(self.generating) + 1
        metrics.TEACHER_BATCH_SIZE.observe(batch_size)
        metrics.TEACHER_BATCH_FILL.observe(max(0.0, time.time() - delivery.dequeued_at))
        if delivery.job.guidance.mode == GuidanceMode.NONE:
            done = Generated(
                delivery=delivery, result=NO_GUIDANCE, started_at=time.time(), seconds=0.0, batch_size=1
            )
            self._ready.append((done, began))
            self._ready_now.set()
            return
        self.worker.prepare_students([delivery.job])
        task = asyncio.create_task(self._generate(delivery, batch_size=batch_size, began=began))
        self.generating[delivery.entry_id] = task

    async def _generate(self, delivery: Delivery, *, batch_size: int, began: float) -> None:
        """Step 2 for one job."""
        started, started_at = time.perf_counter(), time.time()
        try:
            result = await self.worker.backend.generate(self.worker.request(delivery.job))
        except Exception as exc:  # a bug in a backend fails its job, never the teacher
            log.exception("teacher generation failed unexpectedly", extra={"job_id": delivery.job.id})
            result = BackendError(
                f"the teacher failed ({type(exc).__name__})", code=StatusCode.INTERNAL, kind="internal"
            )
        seconds = time.perf_counter() - started
        metrics.TEACHER_GENERATION.observe(seconds)
        del self.generating[delivery.entry_id]
        done = Generated(
            delivery=delivery, result=result, started_at=started_at, seconds=seconds, batch_size=batch_size
        )
        self._ready.append((done, began))
        self._ready_now.set()
        self._changed.set()

    async def _publish_ready(self) -> None:
        """Steps 3 and 4 for whatever is ready: one job alone when the teacher is quiet, all that ended
        meanwhile in one round trip when it is busy."""
        while True:
            await self._ready_now.wait()
            ready, self._ready = self._ready, []
            if not ready:
                self._ready_now.clear()
                continue
            try:
                await self.worker.publish([done for done, _ in ready])
                at_once = self.limit
                pace = None
                for _, began in ready:
                    pace = self.worker.record_pace(seconds=time.perf_counter() - began, at_once=at_once)
                await self._ack([done.delivery for done, _ in ready], pace=pace)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                # Not acknowledged: the jobs stay pending and are claimed again after the claim idle time.
                log.warning(
                    "guidance not published (redis unavailable)",
                    extra={"error": str(exc), "jobs": len(ready)},
                )
            except Exception:
                log.exception("guidance not published", extra={"jobs": len(ready)})
            finally:
                self.held.difference_update(done.delivery.entry_id for done, _ in ready)
                if not self._ready:
                    self._ready_now.clear()
                    self._idle.set()
                self._changed.set()

    async def _ack(self, deliveries: list[Delivery], *, pace: str | None = None) -> None:
        try:
            await self.worker.ack([d.entry_id for d in deliveries], pace=pace, taken=deliveries)
        finally:
            self.held.difference_update(d.entry_id for d in deliveries)
