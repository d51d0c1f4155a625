"""A student process's state, built once at start: its backend (the model's engine, or an inference
server's client), the Redis publisher, the jobs it holds, its heartbeat, its own queue, and the timer
that keeps its jobs' leases fresh and takes over orphaned jobs."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from gkt import leases, metrics
from gkt.connections import connect, outlasting
from gkt.jobs import Guidance, Job
from gkt.keys import Keys
from gkt.prompts import student_prompt
from gkt.publisher import SyncEventPublisher
from services.student.backends import build_backend
from services.student.backends.base import StudentBackend
from services.student.completion import JobLimits, run_job
from services.student.heartbeat import Heartbeat
from services.student.jobbook import JobBook
from services.student.settings import StudentServerSettings, StudentSettings

log = logging.getLogger(__name__)

REDIS_OUTAGE_S = 30.0
"""A Redis restart or a Sentinel failover this long is waited out: a job's next publish blocks until Redis
is back, and the job goes on (a longer outage leaves the job to its lease)."""

PREPARED_TTL_S = 60
"""How long the teacher may route a prepared job to its student: about the longest guidance wait."""
PREPARE_TIMEOUT_S = 30.0
"""Longest wait of a prepare task for the engine (it holds a task thread meanwhile)."""

SendTask = Callable[[str, str], None]
"""Sends a student task (job JSON, guidance JSON) to the queue: how orphaned jobs are sent again."""


class StudentRuntime:
    """One per student process; task threads call `run`, a timer thread keeps the process's promises."""

    def __init__(
        self,
        *,
        settings: StudentSettings,
        backend: StudentBackend,
        publisher: SyncEventPublisher,
        book: JobBook,
        heartbeat: Heartbeat,
        send_task: SendTask,
        own_queue: str = "",
    ) -> None:
        self.settings = settings
        self.own_queue = own_queue
        """The Celery queue only this worker consumes: where the teacher sends the jobs it prepared."""
        self.backend = backend
        self.publisher = publisher
        self.book = book
        self.heartbeat = heartbeat
        self.limits = JobLimits(
            max_attempts=settings.student_max_attempts,
            time_limit_s=settings.student_task_time_limit_s,
            stream_interval_s=settings.student_stream_interval_ms / 1000,
        )
        self._send_task = send_task
        self._stopping = threading.Event()
        self._timer = threading.Thread(target=self._keep_alive, name="gkt-student-timer", daemon=True)

    @classmethod
    def start(
        cls,
        settings: StudentSettings,
        *,
        remote: StudentServerSettings | None,
        send_task: SendTask,
        own_queue: str = "",
    ) -> StudentRuntime:
        """Start the backend (load and warm the model, or connect to its server), the heartbeat and the
        timer; the first heartbeat says ready."""
        backend = build_backend(settings, remote=remote)
        keys = Keys(settings.key_prefix)
        redis = connect(settings.redis_url, retry=outlasting(REDIS_OUTAGE_S))
        publisher = SyncEventPublisher(redis, keys=keys, ttl_s=settings.job_ttl_s)
        publisher.watch_cancellations()
        name = f"{socket.gethostname()}-{os.getpid()}"
        book = JobBook(
            redis, keys=keys, owner=name, lease_s=settings.student_lease_s, ttl_s=settings.job_ttl_s
        )
        heartbeat = Heartbeat(
            redis=redis, key=keys.heartbeat("student", name), capacity=settings.student_max_batch
        )
        runtime = cls(
            settings=settings,
            backend=backend,
            publisher=publisher,
            book=book,
            heartbeat=heartbeat,
            send_task=send_task,
            own_queue=own_queue,
        )
        heartbeat.start()
        runtime._say_alive()
        runtime._timer.start()
        metrics.STUDENT_WORKERS.set(settings.student_max_batch)
        log.info("student ready", extra={"max_batch": settings.student_max_batch, "backend": backend.name})
        return runtime

    def run(self, job: Job, guidance: Guidance) -> None:
        self.heartbeat.job_started()
        try:
            run_job(
                backend=self.backend,
                job=job,
                guidance=guidance,
                publisher=self.publisher,
                book=self.book,
                limits=self.limits,
            )
        finally:
            self.heartbeat.job_finished()

    def prepare(self, job: Job) -> None:
        """Prefill the job's question while the teacher writes its guidance, then tell the teacher (the
        job's `prepared` key) to send the job to this worker's own queue. Never raises: a prepare that
        fails or comes too late costs the job nothing, it is only counted."""
        if not self.backend.prepares or not self.own_queue:
            return
        redis, keys = self.publisher.redis, self.publisher.keys
        try:
            with redis.pipeline(transaction=False) as pipe:
                pipe.exists(keys.final(job.id))
                pipe.hexists(keys.student_dispatched, job.id)
                pipe.hexists(keys.student_running, job.id)
                moved_on = any(pipe.execute())
            if moved_on or job.expired():
                metrics.STUDENT_PREPARED.labels("late").inc()
                return
            first_part = student_prompt(task=job.task, query=job.query, guidance="")
            if self.backend.prepare(first_part, timeout_s=PREPARE_TIMEOUT_S):
                redis.set(keys.prepared(job.id), self.own_queue, ex=PREPARED_TTL_S)
                metrics.STUDENT_PREPARED.labels("prepared").inc()
        except Exception as exc:
            log.warning(
                "preparing the job's question failed",
                extra={"job_id": job.id, "error": f"{type(exc).__name__}: {exc}"},
            )
            metrics.STUDENT_PREPARED.labels("failed").inc()

    def stop(self) -> None:
        self._stopping.set()
        if self.own_queue:
            with contextlib.suppress(Exception):
                self.publisher.redis.delete(self.publisher.keys.queue_alive(self.own_queue))
        self.heartbeat.stop()
        self.backend.stop()
        self.publisher.stop_watching()

    def _keep_alive(self) -> None:
        """Every quarter lease: renew the leases of held jobs and take over orphaned ones. A Redis outage
        is logged and outlived."""
        every_s = self.settings.student_lease_s / 4
        while not self._stopping.wait(every_s):
            try:
                self._say_alive()
                for lease in self.book.renew():
                    log.warning(
                        "lease lost: another student took the job over", extra={"job_id": lease.job_id}
                    )
                self._take_over_orphans()
            except Exception as exc:
                log.warning("student timer: %s", exc)

    def _say_alive(self) -> None:
        """Tell the teachers this worker's own queue is consumed: they route prepared jobs only to a live
        student (the key outlives one missed renewal, like a lease)."""
        if self.own_queue:
            alive = self.publisher.keys.queue_alive(self.own_queue)
            self.publisher.redis.set(alive, 1, px=int(self.settings.student_lease_s * 1000))

    def _take_over_orphans(self) -> None:
        orphans = leases.sweep(
            self.publisher.redis,
            keys=self.publisher.keys,
            queue=self.publisher.keys.student_queue,
            now=time.time(),
            redelivery_s=self.settings.student_redelivery_s,
            ttl_s=self.settings.job_ttl_s,
        )
        for orphan in orphans:
            job = Job.model_validate_json(orphan.job_json)
            log.warning(
                "job's student stopped renewing its lease; sending it again", extra={"job_id": job.id}
            )
            metrics.STUDENT_TAKEOVERS.inc()
            self._send_task(orphan.job_json, orphan.guidance_json)


_current: StudentRuntime | None = None


def install(runtime: StudentRuntime) -> None:
    """Make `runtime` the process's (the Celery task finds it with `current()`)."""
    global _current
    _current = runtime


def current() -> StudentRuntime:
    if _current is None:
        raise RuntimeError("the student runtime was not started (the worker_init signal builds it)")
    return _current


def stop_current() -> None:
    if _current is not None:
        _current.stop()
