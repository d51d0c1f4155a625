"""Tracing switched on in real processes: one job's spans, written by three services, share one trace."""

from __future__ import annotations

import re
import time
from pathlib import Path

import grpc
import pytest

from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from gkt_tools.stack import Stack
from tests.e2e.conftest import TINY_STACK_ENV

pytest.importorskip("opentelemetry.sdk.trace", reason="the `tracing` extra is not installed")


def test_one_job_is_one_trace_across_gateway_teacher_and_student(
    tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    teacher, student = tiny_models
    stack = Stack(
        state_dir=tmp_path / "stack",
        env={**TINY_STACK_ENV, "GKT_TEACHER_MODEL": str(teacher), "GKT_STUDENT_MODEL": str(student),
             "GKT_KEY_PREFIX": "traced", "GKT_TRACING_ENABLED": "true", "GKT_TRACING_EXPORTER": "console"},
        gateway_addr=f"127.0.0.1:{free_port()}",
    )  # fmt: skip
    stack.start(timeout_s=180)
    try:
        with grpc.insecure_channel(stack.gateway_addr or "") as channel:
            guidance_pb2_grpc.GuidanceServiceStub(channel).Generate(
                pb.GenerateRequest(query="How many trees?", sampling=pb.SamplingParams(max_new_tokens=5)),
                timeout=60,
            )
        spans = _wait_for_spans(stack, count=5)
    finally:
        stack.stop()

    where = {name: process for name, _, process in spans}
    assert len(spans) == len(where) == 5
    assert where == {
        "gkt.v1.GuidanceService/Generate": "gateway",
        "gkt.teacher.queue_wait": "teacher",
        "gkt.teacher.generate": "teacher",
        "gkt.student.queue_wait": "student-0",
        "gkt.student.generate": "student-0",
    }
    assert len({trace for _, trace, _ in spans}) == 1


def _wait_for_spans(stack: Stack, *, count: int, timeout_s: float = 30) -> list[tuple[str, str, str]]:
    """(span name, trace id, process) from the console exporter's output; spans leave in batches."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = [
            (name, trace, process)
            for process in ("gateway", "teacher", "student-0")
            for name, trace in re.findall(
                r'"name": "([^"]+)",\s*"context": \{\s*"trace_id": "(0x[0-9a-f]+)"', stack.log(process)
            )
        ]
        if len(spans) >= count or time.monotonic() > deadline:
            return spans
        time.sleep(0.5)
