"""The gateway's event reader when Redis goes away: calls following their jobs hear UNAVAILABLE at once,
not at their deadline. A private redis-server, shut down under a real gateway."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import grpc
import pytest
from redis import Redis

from gkt.queue import Keys
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from services.gateway.server import Gateway
from services.gateway.settings import GatewaySettings
from services.stack import free_port
from tests.conftest import redis_server

KEYS = Keys("events")


async def test_calls_following_their_jobs_hear_unavailable_at_once_when_redis_goes_away(
    tmp_path: Path,
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    settings = GatewaySettings(
        redis_url=url, gateway_addr=f"127.0.0.1:{free_port()}", gateway_metrics_port=0, key_prefix=KEYS.prefix
    )
    with redis_server(tmp_path, url, "--port", str(port)):
        redis = Redis.from_url(url)
        gateway = Gateway(settings)
        await gateway.start()
        try:
            async with grpc.aio.insecure_channel(settings.gateway_addr) as channel:
                stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
                calls = [
                    stub.GenerateStream(pb.GenerateRequest(query=f"Q{i}?"), timeout=60) for i in range(3)
                ]
                firsts = [asyncio.ensure_future(call.read()) for call in calls]
                deadline = time.monotonic() + 10
                while redis.xlen(KEYS.queries) < 3:  # each call follows its queued job
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                with contextlib.suppress(Exception):
                    redis.shutdown(nosave=True)
                started = time.monotonic()

                for first in firsts:
                    with pytest.raises(grpc.aio.AioRpcError) as gone:
                        await asyncio.wait_for(first, timeout=20)
                    assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - started < 20  # long before their 60 s deadline
        finally:
            await gateway.stop()
            redis.close()
