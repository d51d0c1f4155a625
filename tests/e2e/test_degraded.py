"""Degraded mode end to end: no teacher runs, so the gateway answers from real student workers alone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from redis import Redis

from gkt.keys import Keys
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from gkt_tools.stack import Stack
from tests.e2e.conftest import TINY_STACK_ENV

PREFIX = "degraded"
QUESTION = pb.GenerateRequest(
    query="What is 3 + 4?",
    task=pb.TASK_GSM8K,
    guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_CUTOFF),
    sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=6),
)


@pytest.fixture(scope="module")
def teacherless(
    tiny_models: tuple[Path, Path], redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    _, student = tiny_models
    env = {**TINY_STACK_ENV, "GKT_STUDENT_MODEL": str(student), "GKT_KEY_PREFIX": PREFIX,
           "GKT_GATEWAY_DEGRADED_AFTER_S": "2"}  # fmt: skip
    stack = Stack(
        state_dir=tmp_path_factory.mktemp("teacherless"),
        env=env,
        redis_url=redis_url.rsplit("/", 1)[0] + "/2",  # its own database: the Celery queue name is shared
        students=1,
        gateway_addr=f"127.0.0.1:{free_port()}",
        teacher=False,
    )
    stack.start(timeout_s=180)
    yield stack
    stack.stop()


@pytest.fixture
def stub(teacherless: Stack) -> Iterator[guidance_pb2_grpc.GuidanceServiceStub]:
    with grpc.insecure_channel(teacherless.gateway_addr or "") as channel:
        yield guidance_pb2_grpc.GuidanceServiceStub(channel)


def test_generate_is_answered_by_the_student_alone_and_marked_degraded(
    stub: guidance_pb2_grpc.GuidanceServiceStub,
) -> None:
    reply = stub.Generate(QUESTION, timeout=120)
    assert reply.degraded
    assert reply.guidance == "" and reply.usage.guidance_tokens == 0
    assert reply.timings.student_ms > 0 and reply.timings.teacher_ms == 0
    assert reply.finish_reason in ("stop", "length", "eos")


def test_a_degraded_stream_has_an_empty_guidance_then_the_students_text(
    stub: guidance_pb2_grpc.GuidanceServiceStub,
) -> None:
    events = list(stub.GenerateStream(QUESTION, timeout=120))
    assert events[0].HasField("guidance") and events[0].guidance.guidance == ""
    assert events[-1].HasField("final") and events[-1].final.degraded
    streamed = "".join(e.delta.text for e in events if e.HasField("delta"))
    assert streamed == events[-1].final.text


def test_guide_is_unavailable_while_degraded(stub: guidance_pb2_grpc.GuidanceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Guide(pb.GuideRequest(query="What is 3 + 4?"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_teacher_reading_again_ends_degraded_mode(
    stub: guidance_pb2_grpc.GuidanceServiceStub, teacherless: Stack
) -> None:
    redis = Redis.from_url(teacherless.redis_url or "")
    redis.set(Keys(PREFIX).teacher_read, f"{time.time():.3f}")  # what a teacher writes after each read
    try:
        with pytest.raises(grpc.RpcError) as caught:  # queued for a teacher, which never comes
            stub.Generate(QUESTION, timeout=1.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert redis.xlen(Keys(PREFIX).queries) >= 1
    finally:
        redis.delete(Keys(PREFIX).teacher_read)
        redis.close()
    assert stub.Generate(QUESTION, timeout=120).degraded  # silent again: straight to the students


def test_a_running_teacher_marks_that_it_reads_the_queue(tiny_stack: Stack) -> None:
    redis = Redis.from_url(tiny_stack.redis_url or "")
    deadline = time.monotonic() + 15  # the first mark follows the teacher's first read (up to 1 s blocked)
    try:
        while (last_read := redis.get(Keys("e2e").teacher_read)) is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        redis.close()
    assert last_read is not None and time.time() - float(last_read) < 10
