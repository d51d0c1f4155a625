"""The real bundled pair end to end: Gemma 3 270M teaches SmolLM2-135M through the gRPC API."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from gkt_tools.stack import Stack
from tests.e2e.conftest import TINY_STACK_ENV


@pytest.fixture(scope="module")
def real_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        state_dir=tmp_path_factory.mktemp("real-stack"),
        env={**TINY_STACK_ENV, "GKT_KEY_PREFIX": "real", "GKT_STUDENT_WARMUP": "true"},
        redis_url=redis_url.rsplit("/", 1)[0] + "/2",
        gateway_addr=f"127.0.0.1:{free_port()}",
    )
    stack.start(timeout_s=900)  # a fresh machine converts both GGUF files first
    yield stack
    stack.stop()


@pytest.mark.real_models
def test_gemma_guides_smollm_on_a_gsm8k_question(real_stack: Stack) -> None:
    question = "Tom has 3 boxes with 4 apples in each box. How many apples does Tom have?"
    with grpc.insecure_channel(real_stack.gateway_addr or "") as channel:
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
        reply = stub.Generate(
            pb.GenerateRequest(
                query=question,
                task=pb.TASK_GSM8K,
                guidance=pb.GuidanceParams(max_guidance_tokens=10),
                sampling=pb.SamplingParams(temperature=0, max_new_tokens=40, seed=0),
            ),
            timeout=300,
        )
        guide = stub.Guide(
            pb.GuideRequest(
                query=question, task=pb.TASK_GSM8K, guidance=pb.GuidanceParams(max_guidance_tokens=10)
            ),
            timeout=300,
        )
    assert reply.guidance.strip()
    assert reply.usage.guidance_tokens == 10
    assert reply.text.startswith(reply.guidance)
    assert len(reply.text) > len(reply.guidance)
    assert 0 < reply.usage.completion_tokens <= 40
    assert "\nQ:" not in reply.text
    assert reply.timings.teacher_ms > 0 and reply.timings.student_ms > 0
    assert reply.timings.total_ms >= reply.timings.teacher_ms + reply.timings.student_ms
    # greedy teacher: the same guidance whether asked through Generate or Guide
    assert guide.guidance == reply.guidance
