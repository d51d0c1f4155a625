"""The Celery worker of the bench's Celery floor: it answers each task on its reply stream, as a student
publishes its final event (`floors.floor_processes` starts it: `celery -A gkt_tools.bench.floor_worker worker`).

Celery needs an importable app, so the app and its settings are built when the module is imported.
"""

from __future__ import annotations

from celery import Celery
from redis import Redis

from gkt.config import CommonSettings
from gkt_tools.bench.floors import FLOOR_TASK, reply

settings = CommonSettings()
app = Celery("gkt-bench-floor", broker=settings.redis_url)
app.conf.update(
    # The student's settings, so the floor pays what a student task pays.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
_redis = Redis.from_url(settings.redis_url)


@app.task(name=FLOOR_TASK)
def reply_task(reply_key: str) -> None:
    """Answer on the reply stream, as a student publishes its final event."""
    reply(_redis, reply_key)
