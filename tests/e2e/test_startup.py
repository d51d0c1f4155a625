"""A stack starts however far apart its workers become ready (a first model conversion takes minutes)."""

from __future__ import annotations

from pathlib import Path

import grpc

from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from services.stack import Stack, free_port
from tests.e2e.conftest import TINY_STACK_ENV

# Longer than a heartbeat's 60 s life: a student that beat only at start and per job would be gone.
TEACHER_LATE_BY_S = 90


def test_a_teacher_ready_long_after_its_students_still_makes_the_stack_ready(
    tiny_models: tuple[Path, Path], redis_url: str, tmp_path: Path
) -> None:
    teacher, student = tiny_models
    env = {**TINY_STACK_ENV, "GKT_TEACHER_MODEL": str(teacher), "GKT_STUDENT_MODEL": str(student),
           "GKT_KEY_PREFIX": "late", "GKT_TEACHER_START_DELAY_S": str(TEACHER_LATE_BY_S)}  # fmt: skip
    stack = Stack(
        state_dir=tmp_path,
        env=env,
        redis_url=redis_url.rsplit("/", 1)[0] + "/3",  # its own database: the Celery queue name is shared
        students=1,
        gateway_addr=f"127.0.0.1:{free_port()}",
    )
    stack.start(timeout_s=TEACHER_LATE_BY_S + 240)
    try:
        assert f"start delayed by {TEACHER_LATE_BY_S} s" in stack.log("teacher")
        with grpc.insecure_channel(stack.gateway_addr or "") as channel:
            reply = guidance_pb2_grpc.GuidanceServiceStub(channel).Generate(
                pb.GenerateRequest(query="2+2?", sampling=pb.SamplingParams(max_new_tokens=4, seed=1)),
                timeout=120,
            )
        assert reply.guidance and reply.text.startswith(reply.guidance)
    finally:
        stack.stop()
