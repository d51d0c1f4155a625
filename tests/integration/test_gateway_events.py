"""The gateway's event reader when Redis goes away: calls following their jobs hear UNAVAILABLE at once,
not at their deadline. A private redis-server, shut down under a real gateway."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ResponseError

from gkt.jobs import Completion, FinalEvent, Guidance, GuidanceEvent, Job
from gkt.keys import Keys
from gkt.queue import AnyEvent, publish_events
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from services.gateway.server import Gateway
from services.gateway.settings import GatewaySettings
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


async def test_without_client_unblock_a_call_still_gets_its_answer(tmp_path: Path) -> None:
    """A Redis user that may not run CLIENT ID and CLIENT UNBLOCK: the reader cannot be woken, so a new
    call's events come with the next read, at most one blocking read (1 s) later; nothing fails."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    settings = GatewaySettings(
        redis_url=url, gateway_addr=f"127.0.0.1:{free_port()}", gateway_metrics_port=0, key_prefix=KEYS.prefix
    )
    acl = ["--user", "default", "on", "nopass", "~*", "&*", "+@all", "-client|id", "-client|unblock"]
    with redis_server(tmp_path, url, "--port", str(port), *acl):
        redis = Redis.from_url(url)
        with pytest.raises(ResponseError, match="no permissions"):
            redis.client_id()
        gateway = Gateway(settings)
        await gateway.start()
        try:
            async with grpc.aio.insecure_channel(settings.gateway_addr) as channel:
                stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
                for i in range(3):
                    call = asyncio.ensure_future(
                        stub.Generate(pb.GenerateRequest(query=f"Q{i}?"), timeout=30)
                    )
                    deadline = time.monotonic() + 10
                    while redis.xlen(KEYS.queries) <= i:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.02)
                    entries: Any = redis.xrange(KEYS.queries)
                    job = Job.model_validate_json(entries[i][1][b"job"])
                    await _answer(url, job, f"answer {i}")
                    assert (await call).text == f"answer {i}"
        finally:
            await gateway.stop()
            redis.close()


async def _answer(url: str, job: Job, text: str) -> None:
    client = AsyncRedis.from_url(url)
    guidance = Guidance(text="", token_count=0, finish_reason="none")
    events: list[tuple[str, AnyEvent]] = [
        (job.id, GuidanceEvent(guidance=guidance)),
        (job.id, FinalEvent(completion=Completion(text=text, guidance=guidance))),
    ]
    await publish_events(client, keys=KEYS, events=events, ttl_s=60)
    await client.aclose()
