"""One key prefix, one deployment: two stacks with different GKT_KEY_PREFIX on one Redis database answer
their own jobs only, and every key either makes, Celery's included, lies under its prefix.

Real processes on the echo backends: two teachers, two Celery students, two gateways, one redis-server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from redis import Redis

from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from gkt_tools.stack import Stack

PREFIXES = ("alpha", "beta")
CALLS = 12
ECHO_ENV = {
    "GKT_TEACHER_BACKEND": "echo-benchmark-only",
    "GKT_STUDENT_MODEL": "echo-benchmark-only",
    "GKT_STUDENT_WARMUP": "false",
    "GKT_TEACHER_MAX_WAIT_MS": "5",
    "GKT_LOG_LEVEL": "WARNING",
    "GKT_GATEWAY_METRICS_PORT": "0",
    "GKT_TEACHER_METRICS_PORT": "0",
    "GKT_STUDENT_METRICS_PORT": "0",
}


@pytest.fixture
def two_stacks(redis_url: str, tmp_path: Path) -> Iterator[tuple[str, list[Stack]]]:
    shared = redis_url.rsplit("/", 1)[0] + "/3"
    Redis.from_url(shared).flushdb()
    with contextlib.ExitStack() as running:
        stacks = []
        for prefix in PREFIXES:
            stack = Stack(
                state_dir=tmp_path / prefix,
                env={**ECHO_ENV, "GKT_KEY_PREFIX": prefix},
                redis_url=shared,
                gateway_addr=f"127.0.0.1:{free_port()}",
            )
            stack.start(timeout_s=180)
            running.callback(stack.stop)
            stacks.append(stack)
        yield shared, stacks


def test_two_prefixes_on_one_database_answer_their_own_jobs_and_share_no_key(
    two_stacks: tuple[str, list[Stack]],
) -> None:
    shared, stacks = two_stacks
    for stack in stacks:
        with grpc.insecure_channel(stack.gateway_addr or "") as channel:
            stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
            calls = [
                stub.Generate.future(
                    pb.GenerateRequest(query=f"Question {i}?", sampling=pb.SamplingParams(max_new_tokens=4)),
                    timeout=60,
                )
                for i in range(CALLS)
            ]
            assert len({call.result().job_id for call in calls}) == CALLS  # every job answered

    keys = sorted(key.decode() for key in Redis.from_url(shared).scan_iter(count=1000))
    assert keys, "the stacks left no key at all"
    strays = [key for key in keys if not key.startswith(tuple(f"{prefix}:" for prefix in PREFIXES))]
    assert strays == []
    for prefix in PREFIXES:  # Celery's own keys are there, under each prefix
        assert f"{prefix}:_kombu.binding.student" in keys
