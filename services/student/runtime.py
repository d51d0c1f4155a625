"""A student process's state, built once at start: its backend (the model's engine, or an inference
server's client), the Redis publisher, the jobs it holds, its heartbeat, and the timer that keeps its
jobs' leases fresh and takes over orphaned jobs."""

from __future__ import annotations

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
    ) -> None:
        self.settings = settings
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
        cls, settings: StudentSettings, *, remote: StudentServerSettings | None, send_task: SendTask
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
        )
        heartbeat.start()
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

    def stop(self) -> None:
        self._stopping.set()
        self.heartbeat.stop()
        self.backend.stop()
        self.publisher.stop_watching()

    def _keep_alive(self) -> None:
        """Every quarter lease: renew the leases of held jobs and take over orphaned ones. A Redis outage
        is logged and outlived."""
        every_s = self.settings.student_lease_s / 4
        while not self._stopping.wait(every_s):
            try:
                for lease in self.book.renew():
                    log.warning(
                        "lease lost: another student took the job over", extra={"job_id": lease.job_id}
                    )
                self._take_over_orphans()
            except Exception as exc:
                log.warning("student timer: %s", exc)

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
