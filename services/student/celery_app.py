"""The student Celery app (module-level: Celery workers import it by name)."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import Celery
from celery.signals import (
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)

from gkt import metrics, tracing
from gkt.config import celery_broker
from gkt.logs import configure_logging
from gkt.metrics import serve_metrics
from gkt.queue import STUDENT_QUEUE, Keys, connect
from services.student.heartbeat import Heartbeat
from services.student.settings import StudentSettings

settings = StudentSettings()

app = Celery("gkt-student", include=["services.student.tasks"])
app.conf.update(
    task_default_queue=STUDENT_QUEUE,
    # A job is acknowledged only when it finished; a worker that dies puts it back.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_time_limit=settings.student_task_time_limit_s,
    task_soft_time_limit=settings.soft_time_limit_s,
    task_ignore_result=True,
    # Unacknowledged tasks of a vanished worker come back after this long (it must outlast a job).
    broker_transport_options={"visibility_timeout": settings.student_task_time_limit_s + 60},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    worker_cancel_long_running_tasks_on_connection_loss=True,
    # rediss://: kombu needs the TLS options spelled out (None keeps a plain connection).
    **celery_broker(settings.redis_url),
)

log = logging.getLogger("gkt.student")
# This worker process's heartbeat (set after the fork, once its model is loaded).
_heartbeat: Heartbeat | None = None


@worker_init.connect
def _on_worker_init(**_: Any) -> None:
    configure_logging(level=settings.log_level, service="student")
    log.info("settings %s", settings.describe())
    serve_metrics(port=settings.student_metrics_port)


@worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    from services.student import tasks

    configure_logging(level=settings.log_level, service="student")
    # After the fork: an exporter's background thread does not survive one.
    tracing.configure(tracing.TracingSettings(), service="student")
    tasks.prepare(settings)
    metrics.STUDENT_WORKERS.inc()
    # From a timer, not from jobs: an idle student must not vanish from readiness checks and status.
    global _heartbeat
    key = Keys(settings.key_prefix).heartbeat("student", f"{socket.gethostname()}-{os.getpid()}")
    _heartbeat = Heartbeat(redis=connect(settings.redis_url), key=key)
    _heartbeat.start()
    log.info("student ready", extra={"heartbeat": key})


@task_prerun.connect
def _on_task_start(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.job_started()


@task_postrun.connect
def _on_task_end(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.job_finished()


@worker_process_shutdown.connect
def _on_process_shutdown(pid: int | None = None, **_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())
