"""Request validation and defaults at the gateway's edge (no server needed)."""

from __future__ import annotations

import pytest

from gkt import paper
from gkt.errors import InvalidArgument
from gkt.jobs import GuidanceMode, Job, JobKind, Task
from gkt.v1 import guidance_pb2 as pb
from services.gateway.convert import to_job
from services.gateway.settings import GatewaySettings

SETTINGS = GatewaySettings()


def _job(request: pb.GenerateRequest | pb.GuideRequest, kind: JobKind = JobKind.GENERATE) -> Job:
    return to_job(request, kind=kind, settings=SETTINGS, timeout_s=10.0)


def test_unset_fields_take_the_papers_defaults_for_the_task() -> None:
    job = _job(pb.GenerateRequest(query="How many?", task=pb.TASK_GSM8K))
    assert job.task == Task.GSM8K
    assert job.guidance.mode == GuidanceMode.CUTOFF
    assert (job.guidance.max_guidance_tokens, job.sampling.max_new_tokens) == (40, 300)
    assert (job.sampling.temperature, job.sampling.top_p) == (0.8, 0.95)


def test_explicit_fields_are_kept_and_zero_temperature_is_not_unset() -> None:
    request = pb.GenerateRequest(
        query="q",
        guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_HINT, max_guidance_tokens=7),
        sampling=pb.SamplingParams(temperature=0.0, top_k=5, max_new_tokens=9, seed=42, stop=["END"]),
    )
    job = _job(request)
    assert job.guidance.mode == GuidanceMode.HINT and job.guidance.max_guidance_tokens == 7
    assert job.sampling.greedy and job.sampling.top_k == 5 and job.sampling.max_new_tokens == 9
    assert job.sampling.seed == 42 and job.sampling.stop == ("END",)


def test_unset_seeds_differ_between_jobs() -> None:
    seeds = {_job(pb.GenerateRequest(query="q")).sampling.seed for _ in range(5)}
    assert len(seeds) == 5


def test_the_deadline_travels_with_the_job() -> None:
    job = _job(pb.GenerateRequest(query="q"))
    assert job.deadline is not None and 9.0 < job.deadline - job.enqueued_at <= 10.0


def test_full_mode_defaults_to_a_whole_answer() -> None:
    job = _job(
        pb.GenerateRequest(
            query="q", task=pb.TASK_CSQA, guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_FULL)
        )
    )
    assert job.guidance.max_guidance_tokens == paper.TASK_DEFAULTS[Task.CSQA].student_max_new_tokens == 100


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GenerateRequest(query="x" * 8001), "query"),
        (pb.GenerateRequest(query="a\x00b"), "query"),
        (
            pb.GenerateRequest(query="q", sampling=pb.SamplingParams(temperature=float("nan"))),
            "sampling.temperature",
        ),
        (pb.GenerateRequest(query="q", sampling=pb.SamplingParams(top_p=1.5)), "sampling.top_p"),
        (
            pb.GenerateRequest(query="q", sampling=pb.SamplingParams(max_new_tokens=5000)),
            "sampling.max_new_tokens",
        ),
        (
            pb.GenerateRequest(query="q", sampling=pb.SamplingParams(repetition_penalty=0)),
            "sampling.repetition_penalty",
        ),
        (pb.GenerateRequest(query="q", sampling=pb.SamplingParams(stop=["s"] * 9)), "sampling.stop"),
        (pb.GenerateRequest(query="q", sampling=pb.SamplingParams(stop=["x" * 65])), "sampling.stop"),
        (pb.GenerateRequest(query="q", guidance=pb.GuidanceParams(mode=99)), "guidance.mode"),  # type: ignore[arg-type]
        (
            pb.GenerateRequest(query="q", guidance=pb.GuidanceParams(max_guidance_tokens=513)),
            "guidance.max_guidance_tokens",
        ),
    ],
)
def test_invalid_fields_are_named(request_: pb.GenerateRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _job(request_)
    assert caught.value.field == field


def test_guide_needs_a_teacher() -> None:
    with pytest.raises(InvalidArgument) as caught:
        _job(
            pb.GuideRequest(query="q", guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_NONE)), JobKind.GUIDE
        )
    assert caught.value.field == "guidance.mode"


def test_a_prompt_longer_than_the_character_bound_names_the_query() -> None:
    settings = GatewaySettings(gateway_max_prompt_chars=2500)
    to_job(
        pb.GenerateRequest(query="q" * 200, task=pb.TASK_GSM8K),
        kind=JobKind.GENERATE,
        settings=settings,
        timeout_s=1,
    )
    with pytest.raises(InvalidArgument, match="exemplars") as caught:
        to_job(
            pb.GenerateRequest(query="q" * 400, task=pb.TASK_GSM8K),
            kind=JobKind.GENERATE,
            settings=settings,
            timeout_s=1,
        )
    assert caught.value.field == "query"


@pytest.mark.parametrize("request_id", ["order-42\n", "order 42", "a" * 129, "ordre-42\u00e9"])
def test_a_request_id_must_match_the_pattern_in_full(request_id: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        _job(pb.GenerateRequest(query="q", request_id=request_id))
    assert refused.value.field == "request_id"
    assert (
        _job(pb.GenerateRequest(query="q", request_id="order-42:retry.1_a")).request_id
        == "order-42:retry.1_a"
    )
