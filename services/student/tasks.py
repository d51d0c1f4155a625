"""The Celery task (thin): decode the job, run it, leave the logic to `completion`."""

from __future__ import annotations

import logging

import torch
from celery.exceptions import SoftTimeLimitExceeded

from gkt import logs
from gkt.decoding import PrefixCache, Sampler, decode_steps, few_shot_prefixes
from gkt.jobs import ErrorEvent, Guidance, GuidanceMode, Job
from gkt.models import LoadedModel, load_model
from gkt.queue import STUDENT_TASK, Keys, SyncEventPublisher, connect
from services.student.celery_app import app, settings
from services.student.completion import run_job
from services.student.settings import StudentSettings

log = logging.getLogger(__name__)

# One model and one Redis client per worker process, created after the fork.
_state: dict[str, object] = {}


def prepare(student_settings: StudentSettings) -> tuple[LoadedModel, SyncEventPublisher]:
    """Load the model (and warm it up) once per worker process."""
    if "lm" not in _state:
        if student_settings.torch_threads:
            torch.set_num_threads(student_settings.torch_threads)
        lm = load_model(
            name=student_settings.student_model,
            cache_dir=student_settings.model_cache_dir,
            device=student_settings.student_device,
            dtype=student_settings.student_dtype,
        )
        # Student prompts are task prompts: their shared prefixes are those of the `cutoff` mode.
        reuse = student_settings.student_prefix_cache
        texts = few_shot_prefixes(modes=[GuidanceMode.CUTOFF]) if reuse else []
        prefixes = PrefixCache(lm, texts=texts)
        if student_settings.student_warmup:
            prefixes.warm()
            steps = decode_steps(lm=lm, prompts=["Q: 1+1?\nA:"], samplers=[Sampler()])
            next(steps)
            next(steps)
        _state["lm"] = lm
        _state["prefixes"] = prefixes
        _state["publisher"] = SyncEventPublisher(
            connect(student_settings.redis_url),
            keys=Keys(student_settings.key_prefix),
            ttl_s=student_settings.job_ttl_s,
        )
        _state["publisher"].watch_cancellations()  # type: ignore[attr-defined]
    return _state["lm"], _state["publisher"]  # type: ignore[return-value]


@app.task(name=STUDENT_TASK)
def complete(job_json: str, guidance_json: str) -> None:
    job = Job.model_validate_json(job_json)
    guidance = Guidance.model_validate_json(guidance_json)
    lm, publisher = prepare(settings)
    with logs.job_context(**logs.job_fields(job)):
        try:
            run_job(
                lm=lm,
                job=job,
                guidance=guidance,
                publisher=publisher,
                max_attempts=settings.student_max_attempts,
                prefix_cache=_state["prefixes"],  # type: ignore[arg-type]
                stream_interval_s=settings.student_stream_interval_ms / 1000,
            )
        except SoftTimeLimitExceeded:
            log.warning("student job hit its time limit")
            publisher.publish_final(
                job.id, ErrorEvent(code="DEADLINE_EXCEEDED", message="the student's time limit passed")
            )
