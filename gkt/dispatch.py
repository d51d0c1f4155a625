"""Sending student tasks by name: the teacher enqueues them without importing the student service."""

from __future__ import annotations

from celery import Celery

from gkt.connections import celery_broker
from gkt.jobs import Guidance, Job
from gkt.keys import STUDENT_PREPARE_TASK, STUDENT_QUEUE, STUDENT_TASK


def student_client(*, broker_url: str, key_prefix: str) -> Celery:
    """A Celery app used only to send tasks (no worker, no result backend), its keys under `key_prefix`."""
    app = Celery("gkt-dispatch")
    app.conf.update(
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        # A Redis restart or a Sentinel failover takes seconds: sending a task waits it out (about 30 s)
        # instead of failing the teacher's batch (the teacher sends from threads, its loop goes on).
        task_publish_retry_policy={
            "max_retries": 30,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        **celery_broker(broker_url, key_prefix=key_prefix),
    )
    return app


def dispatch_student(app: Celery, *, job: Job, guidance: Guidance, queue: str = STUDENT_QUEUE) -> None:
    """One Celery task per job, to the shared queue or the own queue of the student that prepared it; the
    task's id is the job id, so a redelivery is recognisable."""
    app.send_task(
        STUDENT_TASK,
        args=[job.model_dump_json(), guidance.model_dump_json()],
        queue=queue,
        task_id=job.id,
    )


def prepare_student(app: Celery, *, job: Job) -> None:
    """Ask any student to prefill the job's question while the teacher writes its guidance."""
    app.send_task(STUDENT_PREPARE_TASK, args=[job.model_dump_json()], queue=STUDENT_QUEUE)
