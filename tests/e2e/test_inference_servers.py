"""The production layout with real processes: a TGI teacher server, an OpenAI-compatible (vLLM) student
server, a pipelined teacher worker and a Celery student that is a thin client, behind the gRPC gateway.

TGI and vLLM cannot run here (no GPU, no model hub): two `FakeInferenceServer`s follow their published
APIs instead, and every request the workers send them is checked against TGI's OpenAPI document.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import child_environment, free_port
from gkt_tools.stack import Stack
from services.student.__main__ import worker_command
from services.student.celery_app import STARTUP_FAILED
from tests.integration.fake_inference_server import FakeInferenceServer, published_api_servers

TIMEOUT = 60
IN_FLIGHT = 4
JOBS = 8


@pytest.fixture
def servers() -> Iterator[tuple[FakeInferenceServer, FakeInferenceServer]]:
    with published_api_servers() as start:
        # Each holds a request until IN_FLIGHT are open at once (a second at most), so the overlap the
        # workers create is seen whatever the machine's speed.
        yield (
            start(hold_until_in_flight=IN_FLIGHT, info={"model_id": "teacher-13b"}),
            start(hold_until_in_flight=IN_FLIGHT, token_delay_s=0.01, models=["student-7b"]),
        )


@pytest.fixture
def stack(servers: tuple[FakeInferenceServer, FakeInferenceServer], tmp_path: Path) -> Iterator[Stack]:
    teacher_server, student_server = servers
    env = {
        "GKT_TEACHER_BACKEND": "tgi",
        "GKT_TEACHER_URL": teacher_server.url,
        "GKT_TEACHER_MAX_IN_FLIGHT": str(IN_FLIGHT),
        "GKT_TEACHER_TEMPERATURE": "0",
        "GKT_STUDENT_BACKEND": "openai",
        "GKT_STUDENT_URL": student_server.url,
        "GKT_STUDENT_MAX_BATCH": str(IN_FLIGHT),
        # the fake servers' context: 2048 tokens
        "GKT_STUDENT_MAX_NEW_TOKENS": "1024",
        "GKT_GATEWAY_METRICS_PORT": "0",
        "GKT_TEACHER_METRICS_PORT": "0",
        "GKT_STUDENT_METRICS_PORT": "0",
        "GKT_KEY_PREFIX": "servers",
    }
    stack = Stack(state_dir=tmp_path / "stack", env=env, gateway_addr=f"127.0.0.1:{free_port()}")
    stack.start(timeout_s=180)
    yield stack
    stack.stop()


def _request(index: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        query=f"How many crates does truck {index} carry?",
        task=pb.TASK_FREEFORM,
        guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=3),
        sampling=pb.SamplingParams(
            temperature=0.5 + index / 10, top_p=0.9, top_k=10 + index, max_new_tokens=20, seed=100 + index
        ),
    )


def test_jobs_go_through_a_pipelined_teacher_server_and_thin_client_students(
    stack: Stack, servers: tuple[FakeInferenceServer, FakeInferenceServer]
) -> None:
    teacher_server, student_server = servers
    with grpc.insecure_channel(stack.gateway_addr or "") as channel:
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
        with ThreadPoolExecutor(JOBS) as pool:
            replies = list(pool.map(lambda i: stub.Generate(_request(i), timeout=TIMEOUT), range(JOBS)))
        streamed = list(stub.GenerateStream(_request(JOBS), timeout=TIMEOUT))

    for index, reply in enumerate(replies):
        # the fake teacher names the question's last word, the fake student goes on from the guidance
        assert reply.guidance == "carry is easy."
        assert reply.text == "carry is easy. carry is easy. The answer is 42."
        assert reply.finish_reason == "stop"
        assert reply.seed == 100 + index
    # the teacher kept IN_FLIGHT requests at its server; each student held as many streams as it has slots
    assert teacher_server.max_in_flight == IN_FLIGHT
    assert student_server.max_in_flight == IN_FLIGHT
    # every job's own sampling reached the student's server
    sent = {e.request_json["seed"]: e.request_json for e in student_server.generation_requests()}
    for index in range(JOBS):
        body = sent[100 + index]
        assert body | {"top_k": 10 + index, "max_tokens": 20, "stream": True} == body
        # float32 on the wire of the gRPC API
        assert (body["temperature"], body["top_p"]) == (pytest.approx(0.5 + index / 10), pytest.approx(0.9))
    assert {e.request_json.get("model") for e in student_server.generation_requests()} == {"student-7b"}
    # a streamed call: the guidance first, then the student's deltas, then the final answer
    kinds = [message.WhichOneof("event") for message in streamed]
    assert kinds[0] == "guidance" and kinds[-1] == "final" and "delta" in kinds
    deltas = "".join(m.delta.text for m in streamed if m.WhichOneof("event") == "delta")
    assert streamed[-1].final.text == streamed[0].guidance.guidance + deltas


def test_a_student_whose_server_cannot_serve_its_limits_exits_instead_of_taking_jobs(
    servers: tuple[FakeInferenceServer, FakeInferenceServer], redis_url: str
) -> None:
    _, student_server = servers
    env = child_environment(
        {
            "GKT_REDIS_URL": redis_url,
            "GKT_KEY_PREFIX": "refused",
            "GKT_STUDENT_BACKEND": "openai",
            "GKT_STUDENT_URL": student_server.url,
            "GKT_STUDENT_MAX_NEW_TOKENS": "4096",  # the fake server's context is 2048 tokens
            "GKT_STUDENT_METRICS_PORT": "0",
        }
    )
    # The worker alone, without the parent that would start it again.
    worker = subprocess.run(
        worker_command(name="refused", log_level="INFO"), env=env, capture_output=True, text=True, timeout=120
    )
    assert worker.returncode == STARTUP_FAILED
    assert "student cannot start: ValueError: GKT_STUDENT_MAX_NEW_TOKENS (4096)" in worker.stderr
    assert "max_model_len 2048" in worker.stderr
    assert student_server.generation_requests() == []
