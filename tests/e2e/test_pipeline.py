"""The whole path through the gRPC API with real processes: gateway → Redis → teacher → Celery → gateway."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from gkt.v1 import guidance_pb2 as pb
from gkt_tools.stack import Stack

TIMEOUT = 60


def _request(
    query: str,
    *,
    seed: int,
    temperature: float,
    top_p: float = 0.95,
    top_k: int = 0,
    max_new_tokens: int = 12,
    guidance_tokens: int = 6,
    task: pb.Task = pb.TASK_GSM8K,
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        query=query,
        task=task,
        guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=guidance_tokens),
        sampling=pb.SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed
        ),
    )  # fmt: skip


def _all_at_once(call, requests: list) -> list:
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: call(r, timeout=TIMEOUT), requests))


def test_concurrent_jobs_share_a_teacher_batch_and_keep_their_own_sampling(stub) -> None:
    requests = [
        _request("How many apples are left?", seed=7, temperature=0.9, top_k=20),
        _request("How many pears are left?", seed=7, temperature=0.9, top_k=20),
        _request("How many apples are left?", seed=7, temperature=0.9, top_k=20),
        _request("How many apples are left?", seed=0, temperature=0.0),
        _request("How many apples are left?", seed=99, temperature=0.0),
        _request("How many apples are left?", seed=8, temperature=1.5, top_p=0.5),
    ]
    replies = _all_at_once(stub.Generate, requests)

    assert max(r.timings.teacher_batch_size for r in replies) >= 2
    # same query, seed and settings → identical text, even though each ran as its own job
    assert replies[0].text == replies[2].text
    # greedy ignores the seed
    assert replies[3].text == replies[4].text
    # each job's own settings were applied: a different seed or temperature changes the text
    assert len({replies[0].text, replies[3].text, replies[5].text}) == 3
    for reply in replies:
        assert reply.text.startswith(reply.guidance)
        assert reply.usage.guidance_tokens == 6
        assert 1 <= reply.usage.completion_tokens <= 12 or reply.finish_reason == "eos"


def test_greedy_guidance_is_the_same_alone_and_in_a_padded_batch(stub) -> None:
    def guide(query: str) -> pb.GuideRequest:
        return pb.GuideRequest(query=query, task=pb.TASK_FREEFORM,
                               guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=10))  # fmt: skip

    target = "Why do leaves change colour in autumn?"
    alone = stub.Guide(guide(target), timeout=TIMEOUT)
    assert alone.timings.teacher_batch_size == 1
    mates = [
        "Hi?",
        "A much longer question about trees in a grove and how many the workers plant today?",
        "x",
    ]
    batched = _all_at_once(stub.Guide, [guide(q) for q in [mates[0], target, mates[1], mates[2]]])
    assert batched[1].timings.teacher_batch_size >= 2
    assert batched[1].guidance == alone.guidance
    assert batched[1].guidance_tokens == alone.guidance_tokens == 10


def test_guide_returns_guidance_without_running_a_student(stub) -> None:
    reply = stub.Guide(
        pb.GuideRequest(query="Give me a hint", guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_HINT,
                                                                           max_guidance_tokens=4)),
        timeout=TIMEOUT,
    )  # fmt: skip
    assert reply.guidance
    assert reply.guidance_tokens == 4
    assert reply.timings.student_ms == 0
    assert reply.timings.teacher_ms > 0


def test_stream_delivers_guidance_first_then_deltas_then_the_final_answer(stub) -> None:
    events = list(stub.GenerateStream(_request("Count the trees", seed=3, temperature=0.7, max_new_tokens=16),
                                      timeout=TIMEOUT))  # fmt: skip
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "guidance"
    assert kinds[-1] == "final"
    assert set(kinds[1:-1]) <= {"delta"}
    final = events[-1].final
    streamed = events[0].guidance.guidance + "".join(e.delta.text for e in events if e.HasField("delta"))
    assert streamed == final.text
    assert final.text.startswith(final.guidance)


def test_mode_none_is_the_student_alone_and_full_is_the_teacher_alone(stub) -> None:
    none = stub.Generate(
        pb.GenerateRequest(query="What is 2 + 2?", guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_NONE),
                           sampling=pb.SamplingParams(temperature=0, max_new_tokens=5)), timeout=TIMEOUT)  # fmt: skip
    assert none.guidance == ""
    assert none.usage.guidance_tokens == 0
    assert none.timings.teacher_ms == 0
    full = stub.Generate(
        pb.GenerateRequest(query="What is 2 + 2?", guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_FULL,
                                                                              max_guidance_tokens=7)),
        timeout=TIMEOUT,
    )  # fmt: skip
    assert full.text == full.guidance
    assert full.usage.completion_tokens == 0
    assert full.usage.guidance_tokens <= 7


def test_retrying_with_the_same_request_id_returns_the_same_job(stub) -> None:
    request = _request("Idempotent?", seed=5, temperature=0.8)
    request.request_id = "retry-test-1"
    first = stub.Generate(request, timeout=TIMEOUT)
    second = stub.Generate(request, timeout=TIMEOUT)
    assert second.job_id == first.job_id
    assert second.text == first.text


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GenerateRequest(query="  "), "query"),
        (pb.GenerateRequest(query="q", sampling=pb.SamplingParams(temperature=-1)), "sampling.temperature"),
        (pb.GenerateRequest(query="q", sampling=pb.SamplingParams(top_p=0)), "sampling.top_p"),
        (pb.GenerateRequest(query="q", sampling=pb.SamplingParams(max_new_tokens=0)), "sampling.max_new_tokens"),
        (pb.GenerateRequest(query="q", sampling=pb.SamplingParams(stop=[""])), "sampling.stop"),
        (pb.GenerateRequest(query="q", task=42), "task"),  # type: ignore[arg-type]
        (pb.GenerateRequest(query="q", guidance=pb.GuidanceParams(max_guidance_tokens=0)),
         "guidance.max_guidance_tokens"),
        (pb.GenerateRequest(query="q", request_id="bad id!"), "request_id"),
    ],
)  # fmt: skip
def test_invalid_requests_name_the_field(stub, request_, field: str) -> None:
    _assert_invalid(stub, request_, field)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        # Under the gateway's character bound, but "x " is two tokens of the tiny vocabularies: the
        # teacher's prompt alone is longer than its 4,096-token context.
        (pb.GenerateRequest(query="x " * 2500), "query"),
        # The student's prompt (about 3,800 tokens with the GSM8K exemplars) fits its context, but not
        # with 1,000 more tokens.
        (pb.GenerateRequest(query="x " * 1500, task=pb.TASK_GSM8K, guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_NONE),
                            sampling=pb.SamplingParams(max_new_tokens=1000)), "sampling.max_new_tokens"),
    ],
)  # fmt: skip
def test_prompts_beyond_the_models_context_are_refused_by_the_workers_naming_the_field(
    stub, request_, field: str
) -> None:
    _assert_invalid(stub, request_, field)


def _assert_invalid(stub, request_: pb.GenerateRequest, field: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request_, timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()
    status = rpc_status.from_call(caught.value)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == field


def test_deadline_exceeded_when_the_client_deadline_is_too_short(stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(_request("slow", seed=1, temperature=0.5, max_new_tokens=64), timeout=0.05)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_health_and_reflection(tiny_stack: Stack) -> None:
    with grpc.insecure_channel(tiny_stack.gateway_addr or "") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="gkt.v1.GuidanceService"), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "gkt.v1.GuidanceService" in names
