"""Backpressure: past `max_queue_depth` waiting jobs the gateway refuses at once and enqueues nothing.

A real gateway and Redis, no teacher: the first jobs stay queued, so the queue's depth is exact.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from redis import Redis

from gkt.queue import Keys
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from services.gateway.server import Gateway
from services.gateway.settings import GatewaySettings
from services.stack import free_port

REQUEST = pb.GenerateRequest(query="Waiting?", sampling=pb.SamplingParams(max_new_tokens=4))


async def test_a_full_queue_answers_resource_exhausted_without_enqueueing(
    redis_url: str, redis: Redis
) -> None:
    settings = GatewaySettings(
        redis_url=redis_url,
        gateway_addr=f"127.0.0.1:{free_port()}",
        gateway_metrics_port=0,
        gateway_max_queue_depth=2,
        key_prefix="admission",
    )
    gateway = Gateway(settings)
    await gateway.start()
    queries = Keys("admission").queries
    try:
        async with grpc.aio.insecure_channel(settings.gateway_addr) as channel:
            stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
            waiting = [asyncio.ensure_future(stub.Generate(REQUEST, timeout=30)) for _ in range(2)]
            for _ in range(1000):  # until both are enqueued
                if redis.xlen(queries) == 2:
                    break
                await asyncio.sleep(0.01)

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(REQUEST, timeout=30)

            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit 2" in (refused.value.details() or "")
            assert redis.xlen(queries) == 2  # the refused job was never enqueued
            for call in waiting:
                call.cancel()
    finally:
        await gateway.stop()
