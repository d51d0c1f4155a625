"""The gateway's queue gauges against a real Redis (depth, and the age of the oldest job), and where
/metrics listens."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request

import pytest
from prometheus_client import REGISTRY
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gkt.jobs import Job
from gkt.keys import Keys
from gkt.metrics import serve_metrics
from gkt.queue import enqueue_job
from gkt_tools.processes import free_port
from services.gateway.service import GatewayService
from services.gateway.settings import GatewaySettings

KEYS = Keys("gmetrics")


async def _sample(redis_url: str) -> None:
    """One round of the gateway's queue sampler."""
    aredis = AsyncRedis.from_url(redis_url)
    settings = GatewaySettings(redis_url=redis_url, key_prefix=KEYS.prefix, gateway_metrics_port=0)
    service = GatewayService(settings=settings, redis=aredis)
    try:
        await service.sample_queues_once()
    finally:
        await service.close()
        await aredis.aclose()


async def test_the_sampler_reports_depth_and_the_oldest_jobs_age(redis_url: str, redis: Redis) -> None:
    # No teacher: the first job has waited 30 s by Redis's clock (its stream id says when it came).
    redis.delete(KEYS.queries)
    seconds, micros = redis.time()
    arrived_ms = seconds * 1000 + micros // 1000 - 30_000
    redis.xadd(
        KEYS.queries, {"job": Job(query="first").model_dump_json(), "tenant": ""}, id=f"{arrived_ms}-0"
    )
    aredis = AsyncRedis.from_url(redis_url)
    await enqueue_job(aredis, keys=KEYS, job=Job(query="second"))
    await aredis.aclose()

    started = time.monotonic()
    await _sample(redis_url)
    age = REGISTRY.get_sample_value("gkt_gateway_oldest_job_age_seconds")
    assert REGISTRY.get_sample_value("gkt_gateway_queue_depth") == 2
    assert age is not None and 30.0 <= age <= 30.0 + (time.monotonic() - started) + 1.0

    redis.delete(KEYS.queries)  # every job acknowledged: the stream is empty
    await _sample(redis_url)
    assert REGISTRY.get_sample_value("gkt_gateway_oldest_job_age_seconds") == 0
    assert REGISTRY.get_sample_value("gkt_gateway_queue_depth") == 0


def test_metrics_listen_on_loopback_only_unless_told_otherwise() -> None:
    settings = GatewaySettings(gateway_metrics_port=free_port())
    port = settings.gateway_metrics_port
    serve_metrics(port=port, addr=settings.metrics_addr)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
    # another address of this host (all of 127/8 is this host on Linux) is not served
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()


def _calls(rpc: str, code: str) -> float:
    return REGISTRY.get_sample_value("gkt_gateway_requests_total", {"rpc": rpc, "code": code}) or 0.0


async def test_client_cancels_and_client_deadlines_are_counted_as_such_not_as_server_errors(
    redis_url: str, redis: Redis
) -> None:
    import grpc

    from gkt.v1 import guidance_pb2 as pb
    from gkt.v1 import guidance_pb2_grpc
    from services.gateway.server import Gateway

    prefix = "gmetrics-codes"
    settings = GatewaySettings(
        redis_url=redis_url,
        key_prefix=prefix,
        gateway_metrics_port=0,
        gateway_addr=f"127.0.0.1:{free_port()}",
    )
    gateway = Gateway(settings)  # no teacher: every job stays queued
    await gateway.start()
    request = pb.GenerateRequest(query="Will anyone answer?")
    codes = [
        (rpc, code)
        for rpc in ("Generate", "GenerateStream")
        for code in ("CANCELLED", "DEADLINE_EXCEEDED", "UNKNOWN")
    ]
    before = {key: _calls(*key) for key in codes}
    try:
        async with grpc.aio.insecure_channel(settings.gateway_addr) as channel:
            stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
            for call in (
                stub.Generate(request, timeout=0.5),
                stub.GenerateStream(request, timeout=0.5).read(),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await call
                assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for start in (stub.Generate, stub.GenerateStream):
                queued = redis.xlen(Keys(prefix).queries)
                call = start(request, timeout=30)
                deadline = time.monotonic() + 10
                while redis.xlen(Keys(prefix).queries) == queued:  # the call's job is queued: it runs
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                call.cancel()

        def counted(rpc: str, code: str) -> float:
            return _calls(rpc, code) - before[(rpc, code)]

        deadline = time.monotonic() + 10
        while not all(counted(rpc, "CANCELLED") == 1 for rpc in ("Generate", "GenerateStream")):
            assert time.monotonic() < deadline, {key: counted(*key) for key in codes}
            await asyncio.sleep(0.05)
        assert {key: counted(*key) for key in codes} == {
            (rpc, code): 1.0 if code != "UNKNOWN" else 0.0 for rpc, code in codes
        }
    finally:
        await gateway.stop()
