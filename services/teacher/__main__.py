"""`python -m services.teacher`: run one teacher worker until SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

import torch

from gkt import tracing
from gkt.connections import connect_async
from gkt.dispatch import dispatch_student, prepare_student, student_client
from gkt.logs import configure_logging
from gkt.metrics import serve_metrics
from services.teacher.backends import build_backend
from services.teacher.settings import REMOTE_BACKENDS, TeacherServerSettings, TeacherSettings
from services.teacher.worker import TeacherWorker

log = logging.getLogger("gkt.teacher")


async def serve(settings: TeacherSettings, *, remote: TeacherServerSettings | None) -> None:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    backend = build_backend(settings, remote=remote)
    await backend.start()
    backend.check_limits(max_guidance_tokens=settings.max_guidance_tokens)
    redis = connect_async(settings.redis_url)
    celery = student_client(broker_url=settings.redis_url, key_prefix=settings.key_prefix)
    worker = TeacherWorker(
        settings=settings,
        redis=redis,
        backend=backend,
        dispatch=lambda job, guidance, queue: dispatch_student(
            celery, job=job, guidance=guidance, queue=queue
        ),
        prepare=(lambda job: prepare_student(celery, job=job)) if settings.teacher_prepare_students else None,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    serve_metrics(port=settings.teacher_metrics_port, addr=settings.metrics_addr)
    try:
        await worker.run()
    finally:
        log.info("teacher stopping")
        await backend.close()
        await redis.aclose()


def main() -> None:
    settings = TeacherSettings()
    remote = TeacherServerSettings() if settings.teacher_backend in REMOTE_BACKENDS else None
    configure_logging(level=settings.log_level, service="teacher")
    tracing.configure(tracing.TracingSettings(), service="teacher")
    log.info("settings %s", settings.describe())
    asyncio.run(serve(settings, remote=remote))


if __name__ == "__main__":
    main()
