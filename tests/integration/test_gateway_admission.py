"""Backpressure: past `max_queue_depth` waiting jobs, or when the queue ahead will outlast a request's
deadline, the gateway refuses at once and enqueues nothing.

A real gateway and Redis, no teacher: the first jobs stay queued, so the queue's depth is exact.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from redis import Redis

from gkt.connections import connect_bounded
from gkt.errors import ResourceExhausted
from gkt.keys import Keys
from gkt.liveness import teacher_pace
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from services.gateway.server import Gateway
from services.gateway.settings import GatewaySettings
from tests.waiting import until_async

REQUEST = pb.GenerateRequest(query="Waiting?", sampling=pb.SamplingParams(max_new_tokens=4))


def _settings(redis_url: str, prefix: str, **overrides: object) -> GatewaySettings:
    return GatewaySettings(
        redis_url=redis_url,
        gateway_addr=f"127.0.0.1:{free_port()}",
        gateway_metrics_port=0,
        key_prefix=prefix,
        **overrides,  # type: ignore[arg-type]
    )


async def _queue(stub: guidance_pb2_grpc.GuidanceServiceStub, redis: Redis, queries: str, n: int) -> list:
    """n requests left waiting in the queue (no teacher reads it)."""
    waiting = [asyncio.ensure_future(stub.Generate(REQUEST, timeout=30)) for _ in range(n)]
    for _ in range(1000):  # until all are enqueued
        if redis.xlen(queries) == n:
            break
        await asyncio.sleep(0.01)
    assert redis.xlen(queries) == n
    return waiting


async def test_a_full_queue_answers_resource_exhausted_without_enqueueing(
    redis_url: str, redis: Redis
) -> None:
    settings = _settings(redis_url, "admission", gateway_max_queue_depth=2)
    gateway = Gateway(settings)
    await gateway.start()
    queries = Keys("admission").queries
    try:
        async with grpc.aio.insecure_channel(settings.gateway_addr) as channel:
            stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
            waiting = await _queue(stub, redis, queries, 2)

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(REQUEST, timeout=30)

            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit 2" in (refused.value.details() or "")
            assert redis.xlen(queries) == 2  # the refused job was never enqueued
            for call in waiting:
                call.cancel()
    finally:
        await gateway.stop()


async def test_a_deadline_the_queue_ahead_will_outlast_is_refused_at_once(
    redis_url: str, redis: Redis
) -> None:
    keys = Keys("admission-wait")
    settings = _settings(redis_url, keys.prefix)
    gateway = Gateway(settings)
    await gateway.start()
    try:
        async with grpc.aio.insecure_channel(settings.gateway_addr) as channel:
            stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
            waiting = await _queue(stub, redis, keys.queries, 4)
            # As a teacher records it after each batch: 2 jobs a batch, 1 s a batch, so 2 s for the 4 ahead.
            redis.hset(
                keys.teacher_pace, "teacher-a", teacher_pace(batch_s=1.0, max_batch_size=2, at=time.time())
            )

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(REQUEST, timeout=1.0)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "about 2.0 s (2.0 jobs/s)" in (refused.value.details() or "")
            assert redis.xlen(keys.queries) == 4  # never enqueued

            # A deadline beyond the wait is admitted (and, with no teacher, runs out queued).
            with pytest.raises(grpc.aio.AioRpcError) as admitted:
                await stub.Generate(REQUEST, timeout=3.0)
            assert admitted.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

            # A second teacher doubles the capacity; a stale pace (a stopped teacher) counts for nothing.
            redis.hset(
                keys.teacher_pace, "teacher-b", teacher_pace(batch_s=1.0, max_batch_size=2, at=time.time())
            )
            redis.hset(
                keys.teacher_pace, "gone", teacher_pace(batch_s=0.001, max_batch_size=8, at=time.time() - 600)
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(REQUEST, timeout=0.8)
            assert "(4.0 jobs/s)" in (refused.value.details() or "")
            for call in waiting:
                call.cancel()
    finally:
        await gateway.stop()


async def test_a_command_that_waits_too_long_for_a_redis_connection_is_overload_not_an_outage(
    redis_url: str, redis: Redis
) -> None:
    client = connect_bounded(redis_url, max_connections=2, wait_s=0.2, client_name="gkt-gateway-test")
    try:
        # both connections busy for a second (blocking pops on an empty list)
        busy = [asyncio.ensure_future(client.blpop(["admission:nothing"], timeout=1)) for _ in range(2)]

        async def both_blocked() -> bool:
            clients = redis.client_list()
            return sum(c.get("name") == "gkt-gateway-test" and c.get("cmd") == "blpop" for c in clients) == 2

        await until_async(both_blocked, what="both connections to block in BLPOP", timeout_s=0.8)
        with pytest.raises(ResourceExhausted, match=r"all 2 Redis connections stayed busy for 0\.2 s"):
            await client.ping()
        await asyncio.gather(*busy)
        assert await client.ping()  # a connection is free again
        names = [c["name"] for c in redis.client_list()]
        assert names.count("gkt-gateway-test") == 2
    finally:
        await client.aclose()
