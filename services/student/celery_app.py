"""The student Celery app (module-level: Celery workers import it by name).

A worker runs a threads pool with one thread per batch slot: each thread holds one job and waits on
the process's backend, which decodes all of them together or streams each from a server
(`services.student.runtime`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_shutdown

from gkt import tracing
from gkt.connections import celery_broker
from gkt.keys import STUDENT_QUEUE, STUDENT_TASK, own_queue
from gkt.logs import configure_logging
from gkt.metrics import serve_metrics
from services.student import broker, runtime
from services.student.settings import REMOTE_BACKENDS, StudentServerSettings, StudentSettings

settings = StudentSettings()
remote = StudentServerSettings() if settings.student_backend in REMOTE_BACKENDS else None
STARTUP_FAILED = 3
"""The worker's exit status when its backend cannot start (a model that does not load, a server refused)."""

app = Celery("gkt-student", include=["services.student.tasks"])
app.conf.update(
    task_default_queue=STUDENT_QUEUE,
    worker_pool="threads",
    worker_concurrency=settings.student_max_batch,
    # A job is acknowledged only when it finished; a worker that dies leaves it unacknowledged, and
    # its lease (gkt.leases) lets another student take it over long before the broker gives it back.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    # A Redis blip must not abandon running jobs: they finish, publish once Redis is back, and their
    # unacknowledgeable tasks return later only to be dropped by their claim.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    # ... and the worker process outlives it: no model reload for a Redis restart or a failover.
    broker_transport=broker.transport_for(settings.redis_url),
    # rediss://: kombu needs the TLS options spelled out (None keeps a plain connection). Every key under
    # GKT_KEY_PREFIX.
    **celery_broker(
        settings.redis_url,
        key_prefix=settings.key_prefix,
        # Unacknowledged tasks come back after this long, checked every 2 s: a task whose worker died
        # before claiming its job is run again; one whose job is running or answered is dropped by its
        # claim (a running job is covered by its lease, so this need not outlast a job).
        transport_options={
            "visibility_timeout": settings.student_redelivery_s,
            "unacked_restore_interval": 2,
            "unacked_restore_throttle": 1,
        },
    ),
)

log = logging.getLogger("gkt.student")


def send_again(job_json: str, guidance_json: str) -> None:
    """Queue a job whose student died (its lease expired) for another student."""
    app.send_task(STUDENT_TASK, args=[job_json, guidance_json], queue=STUDENT_QUEUE)


@worker_init.connect
def _on_worker_init(sender: Any, **_: Any) -> None:
    configure_logging(level=settings.log_level, service="student")
    log.info("settings %s", settings.describe())
    serve_metrics(
        port=settings.student_metrics_port,
        addr=settings.metrics_addr,
        multiprocess_dir=settings.prometheus_multiproc_dir,
    )
    tracing.configure(tracing.TracingSettings(), service="student")
    # A local student also consumes its own queue, where the teacher sends the jobs whose question it
    # prepared (an inference server caches prompts itself: a remote student prepares nothing).
    mine = own_queue(sender.hostname) if remote is None else ""
    if mine:
        sender.app.amqp.queues.select_add(mine)
    # The model loads (or the server is checked) before the worker consumes: a task never waits for it.
    try:
        runtime.install(
            runtime.StudentRuntime.start(settings, remote=remote, send_task=send_again, own_queue=mine)
        )
    except Exception as exc:
        # Celery would log a failed signal handler and consume anyway, failing every task: exit instead
        # (the parent, `python -m services.student`, starts a new worker after a backoff).
        log.critical("student cannot start: %s: %s", type(exc).__name__, exc)
        os._exit(STARTUP_FAILED)


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    runtime.stop_current()
