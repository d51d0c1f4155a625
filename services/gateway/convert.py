"""The edge: protobuf requests → validated domain jobs, domain results → protobuf replies."""

from __future__ import annotations

import math
import re
import secrets
import time

from gkt import paper
from gkt.errors import InvalidArgument
from gkt.jobs import Completion, Guidance, GuidanceMode, GuidanceSpec, Job, JobKind, SamplingParams, Task
from gkt.prompts import student_prompt, teacher_prompt
from gkt.v1 import guidance_pb2 as pb
from services.gateway.settings import GatewaySettings

_TASKS = {
    pb.TASK_UNSPECIFIED: Task.FREEFORM,
    pb.TASK_FREEFORM: Task.FREEFORM,
    pb.TASK_GSM8K: Task.GSM8K,
    pb.TASK_CSQA: Task.CSQA,
    pb.TASK_AQUA: Task.AQUA,
}
_MODES = {
    pb.GUIDANCE_MODE_UNSPECIFIED: GuidanceMode.CUTOFF,
    pb.GUIDANCE_MODE_CUTOFF: GuidanceMode.CUTOFF,
    pb.GUIDANCE_MODE_CONCISE: GuidanceMode.CONCISE,
    pb.GUIDANCE_MODE_HINT: GuidanceMode.HINT,
    pb.GUIDANCE_MODE_NONE: GuidanceMode.NONE,
    pb.GUIDANCE_MODE_FULL: GuidanceMode.FULL,
}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def to_job(
    request: pb.GenerateRequest | pb.GuideRequest,
    *,
    kind: JobKind,
    settings: GatewaySettings,
    timeout_s: float | None,
) -> Job:
    """Validate every field (raising InvalidArgument naming it) and build the job."""
    query = request.query.strip()
    if not query:
        raise InvalidArgument("query", "must not be empty")
    if len(query) > settings.gateway_max_query_chars:
        raise InvalidArgument(
            "query", f"is {len(query)} characters; at most {settings.gateway_max_query_chars}"
        )
    if "\x00" in query:
        raise InvalidArgument("query", "must not contain NUL characters")
    if request.task not in _TASKS:
        raise InvalidArgument("task", f"unknown value {request.task}")
    task = _TASKS[request.task]
    if request.request_id and not _REQUEST_ID.fullmatch(request.request_id):
        raise InvalidArgument("request_id", "1–128 characters of letters, digits and . _ : -")
    defaults = paper.TASK_DEFAULTS[task]
    # The seed of a Guide job, which has no sampling of its own, seeds its teacher's sampling alone.
    sampling = SamplingParams(max_new_tokens=defaults.student_max_new_tokens, seed=secrets.randbits(63))
    if isinstance(request, pb.GenerateRequest):
        sampling = _sampling(request.sampling, default=sampling, settings=settings)
    spec = _guidance(request.guidance, defaults=defaults, settings=settings)
    if kind == JobKind.GUIDE and spec.mode in (GuidanceMode.NONE, GuidanceMode.FULL):
        raise InvalidArgument("guidance.mode", "Guide needs a guidance mode: CUTOFF, CONCISE or HINT")
    _check_prompt_size(query=query, task=task, mode=spec.mode, settings=settings)
    now = time.time()
    return Job(
        kind=kind,
        request_id=request.request_id,
        query=query,
        task=task,
        guidance=spec,
        sampling=sampling,
        enqueued_at=now,
        deadline=now + (timeout_s if timeout_s is not None else settings.gateway_default_timeout_s),
    )


def _guidance(
    params: pb.GuidanceParams, *, defaults: paper.TaskDefaults, settings: GatewaySettings
) -> GuidanceSpec:
    if params.mode not in _MODES:
        raise InvalidArgument("guidance.mode", f"unknown value {params.mode}")
    mode = _MODES[params.mode]
    # A teacher answering alone (FULL) writes as long an answer as a student would.
    tokens = defaults.student_max_new_tokens if mode == GuidanceMode.FULL else defaults.max_guidance_tokens
    if params.HasField("max_guidance_tokens"):
        tokens = params.max_guidance_tokens
        if not 1 <= tokens <= settings.max_guidance_tokens:
            raise InvalidArgument(
                "guidance.max_guidance_tokens", f"is {tokens}; must be 1..{settings.max_guidance_tokens}"
            )
    return GuidanceSpec(mode=mode, max_guidance_tokens=tokens)


def _sampling(
    params: pb.SamplingParams, *, default: SamplingParams, settings: GatewaySettings
) -> SamplingParams:
    values = default.model_dump()
    if params.HasField("temperature"):
        values["temperature"] = _bounded("sampling.temperature", params.temperature, 0.0, 5.0)
    if params.HasField("top_p"):
        values["top_p"] = _bounded("sampling.top_p", params.top_p, 0.0, 1.0, low_open=True)
    if params.HasField("top_k"):
        values["top_k"] = int(_bounded("sampling.top_k", params.top_k, 0, 100_000))
    if params.HasField("max_new_tokens"):
        values["max_new_tokens"] = int(
            _bounded("sampling.max_new_tokens", params.max_new_tokens, 1, settings.gateway_max_new_tokens)
        )
    if params.HasField("seed"):
        values["seed"] = int(_bounded("sampling.seed", params.seed, 0, 2**63 - 1))
    if params.HasField("repetition_penalty"):
        values["repetition_penalty"] = _bounded(
            "sampling.repetition_penalty", params.repetition_penalty, 0.0, 10.0, low_open=True
        )
    if len(params.stop) > settings.gateway_max_stop_sequences:
        raise InvalidArgument(
            "sampling.stop", f"at most {settings.gateway_max_stop_sequences} stop sequences"
        )
    for stop in params.stop:
        if not stop or len(stop) > settings.gateway_max_stop_chars:
            raise InvalidArgument(
                "sampling.stop", f"each stop sequence must be 1..{settings.gateway_max_stop_chars} characters"
            )
        if "\x00" in stop:
            raise InvalidArgument("sampling.stop", "must not contain NUL characters")
    values["stop"] = tuple(params.stop)
    return SamplingParams(**values)


def _check_prompt_size(*, query: str, task: Task, mode: GuidanceMode, settings: GatewaySettings) -> None:
    """Bound the longest prompt a model will see, in characters: the gateway has no tokenizer, so the
    setting stands for the models' context length (a token is at least one character)."""
    prompt = (
        student_prompt(task=task, query=query, guidance="")
        if mode == GuidanceMode.NONE
        else teacher_prompt(task=task, mode=mode, query=query)
    )
    if len(prompt) > settings.gateway_max_prompt_chars:
        raise InvalidArgument(
            "query",
            f"with the {task.value} task's exemplars the prompt is {len(prompt)} characters; "
            f"at most {settings.gateway_max_prompt_chars}",
        )


def _bounded(field: str, value: float, low: float, high: float, *, low_open: bool = False) -> float:
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise InvalidArgument(field, f"is {value}; must be in {bound}")
    return value


def timings(job: Job, guidance: Guidance, completion: Completion | None, *, now: float) -> pb.StageTimings:
    student_ms = student_wait_ms = 0.0
    if completion is not None and completion.student_started_at:
        student_wait_ms = max(0.0, completion.student_started_at - guidance.published_at) * 1000
        student_ms = completion.student_seconds * 1000
    return pb.StageTimings(
        queue_wait_ms=max(0.0, guidance.dequeued_at - job.enqueued_at) * 1000
        if guidance.dequeued_at
        else 0.0,
        teacher_batch_size=guidance.batch_size,
        teacher_ms=guidance.teacher_seconds * 1000,
        student_wait_ms=student_wait_ms,
        student_ms=student_ms,
        total_ms=max(0.0, now - job.enqueued_at) * 1000,
    )


def generate_response(
    job: Job, completion: Completion, *, now: float, degraded: bool = False
) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        job_id=job.id,
        text=completion.text,
        guidance=completion.guidance.text,
        answer=completion.answer,
        usage=pb.Usage(
            guidance_tokens=completion.guidance.token_count, completion_tokens=completion.completion_tokens
        ),
        timings=timings(job, completion.guidance, completion, now=now),
        finish_reason=completion.finish_reason,
        seed=completion.seed,
        degraded=degraded,
    )


def guide_response(job: Job, guidance: Guidance, *, now: float) -> pb.GuideResponse:
    return pb.GuideResponse(
        job_id=job.id,
        guidance=guidance.text,
        guidance_tokens=guidance.token_count,
        timings=timings(job, guidance, None, now=now),
    )


def guidance_update(guidance: Guidance) -> pb.GuidanceUpdate:
    return pb.GuidanceUpdate(
        guidance=guidance.text, guidance_tokens=guidance.token_count, teacher_batch_size=guidance.batch_size
    )
