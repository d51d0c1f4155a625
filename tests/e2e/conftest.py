"""An end-to-end stack on tiny random models: real Redis, teacher, Celery student, gRPC gateway."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from gkt_tools.stack import Stack

# These tests read teacher batches: one batch at a time, and a long batching window makes concurrent
# requests land in one batch however slow the machine is. The pipelined teacher (the default) has its
# own tests (tests/integration/test_teacher_pipeline.py, tests/e2e/test_inference_servers.py).
TINY_STACK_ENV = {
    "GKT_TEACHER_PIPELINE": "false",
    "GKT_TEACHER_TEMPERATURE": "0",
    "GKT_TEACHER_MAX_BATCH_SIZE": "8",
    "GKT_TEACHER_MAX_WAIT_MS": "400",
    "GKT_GATEWAY_METRICS_PORT": "0",
    "GKT_TEACHER_METRICS_PORT": "0",
    "GKT_STUDENT_METRICS_PORT": "0",
    "GKT_STUDENT_WARMUP": "false",
}


@pytest.fixture(scope="package")
def tiny_stack(
    tiny_models: tuple[Path, Path], redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    teacher, student = tiny_models
    env = {**TINY_STACK_ENV, "GKT_TEACHER_MODEL": str(teacher), "GKT_STUDENT_MODEL": str(student),
           "GKT_KEY_PREFIX": "e2e"}  # fmt: skip
    stack = Stack(
        state_dir=tmp_path_factory.mktemp("stack"),
        env=env,
        redis_url=redis_url.rsplit("/", 1)[0] + "/1",  # apart from the integration tests' db 0
        students=2,
        gateway_addr=f"127.0.0.1:{free_port()}",
        free_metrics_ports=True,  # tests/e2e/test_metrics.py scrapes them: stack.metrics_ports
    )
    stack.start(timeout_s=180)
    yield stack
    stack.stop()


@pytest.fixture
def stub(tiny_stack: Stack) -> Iterator[guidance_pb2_grpc.GuidanceServiceStub]:
    with grpc.insecure_channel(tiny_stack.gateway_addr or "") as channel:
        yield guidance_pb2_grpc.GuidanceServiceStub(channel)
