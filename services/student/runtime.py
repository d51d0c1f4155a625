"""A student process's state, built once at start: the model's engine, the Redis publisher, the jobs it
holds, its heartbeat, and the timer that keeps its jobs' leases fresh and takes over orphaned jobs."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import torch

from gkt import leases, metrics
from gkt.connections import connect
from gkt.decoding import PrefixCache, encode, few_shot_prefixes
from gkt.engine import Engine, EngineRequest
from gkt.jobs import Guidance, GuidanceMode, Job
from gkt.keys import Keys
from gkt.models import load_model
from gkt.publisher import SyncEventPublisher
from services.student.completion import JobLimits, run_job
from services.student.heartbeat import Heartbeat
from services.student.jobbook import JobBook
from services.student.settings import StudentSettings

log = logging.getLogger(__name__)

SendTask = Callable[[str, str], None]
"""Sends a student task (job JSON, guidance JSON) to the queue: how orphaned jobs are sent again."""


class StudentRuntime:
    """One per student process; task threads call `run`, a timer thread keeps the process's promises."""

    def __init__(
        self,
        *,
        settings: StudentSettings,
        engine: Engine,
        publisher: SyncEventPublisher,
        book: JobBook,
        heartbeat: Heartbeat,
        send_task: SendTask,
    ) -> None:
        self.settings = settings
        self.engine = engine
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
    def start(cls, settings: StudentSettings, *, send_task: SendTask) -> StudentRuntime:
        """Load the model, warm it, start the engine, the heartbeat and the timer; the first heartbeat
        says ready."""
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        lm = load_model(
            name=settings.student_model,
            cache_dir=settings.model_cache_dir,
            device=settings.student_device,
            dtype=settings.student_dtype,
        )
        # Student prompts are task prompts: their shared prefixes are those of the `cutoff` mode.
        texts = few_shot_prefixes(modes=[GuidanceMode.CUTOFF]) if settings.student_prefix_cache else []
        prefixes = PrefixCache(lm, texts=texts)
        engine = Engine(
            lm,
            max_batch=settings.student_max_batch,
            prefix_cache=prefixes,
            on_step=metrics.STUDENT_BATCH_ROWS.observe,
        )
        if settings.student_warmup:
            prefixes.warm()
            engine.generate([EngineRequest(prompt_ids=encode(lm, "Q: 1+1?\nA:"), max_new_tokens=2)])
        engine.start()
        keys = Keys(settings.key_prefix)
        redis = connect(settings.redis_url)
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
            engine=engine,
            publisher=publisher,
            book=book,
            heartbeat=heartbeat,
            send_task=send_task,
        )
        heartbeat.start()
        runtime._timer.start()
        metrics.STUDENT_WORKERS.set(settings.student_max_batch)
        log.info("student ready", extra={"max_batch": settings.student_max_batch})
        return runtime

    def run(self, job: Job, guidance: Guidance) -> None:
        self.heartbeat.job_started()
        try:
            run_job(
                engine=self.engine,
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
        self.engine.stop()
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
