"""The Celery tasks (thin): decode the job, hand it to the process's runtime."""

from __future__ import annotations

from gkt import logs
from gkt.jobs import Guidance, Job
from gkt.keys import STUDENT_PREPARE_TASK, STUDENT_TASK
from services.student import runtime
from services.student.celery_app import app


@app.task(name=STUDENT_TASK)
def complete(job_json: str, guidance_json: str) -> None:
    job = Job.model_validate_json(job_json)
    guidance = Guidance.model_validate_json(guidance_json)
    with logs.job_context(**logs.job_fields(job)):
        runtime.current().run(job, guidance)


# Acknowledged on receipt: a prepare lost with its worker is not worth running again.
@app.task(name=STUDENT_PREPARE_TASK, acks_late=False)
def prepare(job_json: str) -> None:
    job = Job.model_validate_json(job_json)
    with logs.job_context(**logs.job_fields(job)):
        runtime.current().prepare(job)
