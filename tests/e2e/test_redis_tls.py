"""The whole stack over a Redis that speaks only TLS and wants a password: gateway, teacher and the
Celery students (broker and events) all connect with rediss://, verifying the server's certificate."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import grpc
import pytest

from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from gkt_tools.stack import Stack
from tests.certificates import make_certificates
from tests.conftest import redis_server
from tests.e2e.conftest import TINY_STACK_ENV

PASSWORD = "s3cret-over-tls"


def test_a_request_is_answered_through_a_tls_redis_with_a_password(
    tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    certificates = make_certificates(tmp_path_factory.mktemp("redis-tls-certs"))
    port = free_port()
    ca = quote(str(certificates / "ca.pem"))
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
    tls_only = (
        "--port", "0", "--tls-port", str(port), "--requirepass", PASSWORD, "--tls-auth-clients", "no",
        "--tls-cert-file", str(certificates / "server.pem"), "--tls-key-file", str(certificates / "server.key"),
        "--tls-ca-cert-file", str(certificates / "ca.pem"),
    )  # fmt: skip
    teacher, student = tiny_models
    env = {**TINY_STACK_ENV, "GKT_TEACHER_MODEL": str(teacher), "GKT_STUDENT_MODEL": str(student)}
    with redis_server(tmp_path_factory.mktemp("redis-tls"), url, *tls_only):
        stack = Stack(
            state_dir=tmp_path_factory.mktemp("tls-stack"),
            env=env,
            redis_url=url,
            gateway_addr=f"127.0.0.1:{free_port()}",
        )
        stack.start(timeout_s=180)
        try:
            with grpc.insecure_channel(stack.gateway_addr or "") as channel:
                reply = guidance_pb2_grpc.GuidanceServiceStub(channel).Generate(
                    pb.GenerateRequest(query="How many trees?", sampling=pb.SamplingParams(max_new_tokens=8)),
                    timeout=120,
                )
        finally:
            stack.stop()
    # the student finished it (a random tiny student may stop at its first token, so no token count)
    assert reply.job_id and reply.finish_reason in ("eos", "length") and reply.timings.student_ms > 0
    assert reply.timings.teacher_batch_size == 1  # the teacher answered, not a degraded student-only path
