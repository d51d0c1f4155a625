"""Graceful shutdown of a gateway process on SIGTERM: health says NOT_SERVING at once and is still served,
new calls are refused, the calls in flight (streams too) finish within GKT_GATEWAY_GRACE_S, and what still
runs then is cut and its job cancelled before the process exits.

A real gateway process and Redis; the test plays the workers, publishing the events of the queued jobs.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gkt.jobs import Completion, DeltaEvent, FinalEvent, Guidance, GuidanceEvent, Job
from gkt.keys import Keys
from gkt.queue import publish_events
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import child_environment, free_port

KEYS = Keys("shutdown")
GRACE_S = 4.0


async def _until(check: Any, *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting until {what}")
        await asyncio.sleep(0.05)


async def _publish(redis_url: str, events: list[tuple[str, Any]]) -> None:
    client = AsyncRedis.from_url(redis_url)
    await publish_events(client, keys=KEYS, events=events, ttl_s=60)
    await client.aclose()


async def _collect(call: Any) -> tuple[str, list[str]]:
    """A stream's outcome ("OK" or the status code's name) and the text of its deltas."""
    texts: list[str] = []
    try:
        async for reply in call:
            if reply.HasField("delta"):
                texts.append(reply.delta.text)
        return "OK", texts
    except grpc.aio.AioRpcError as error:
        return error.code().name, texts


@pytest.fixture
def gateway(redis_url: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A gateway process (its address, the process) that the test stops; killed if it does not."""
    addr = f"127.0.0.1:{free_port()}"
    env = child_environment(
        {
            "GKT_REDIS_URL": redis_url,
            "GKT_KEY_PREFIX": KEYS.prefix,
            "GKT_GATEWAY_ADDR": addr,
            "GKT_GATEWAY_METRICS_PORT": "0",
            "GKT_GATEWAY_GRACE_S": str(GRACE_S),
        }
    )
    process = subprocess.Popen([sys.executable, "-m", "services.gateway"], env=env, stderr=subprocess.DEVNULL)
    yield addr, process
    if process.poll() is None:
        process.kill()
        process.wait()


async def test_sigterm_drains_streams_in_flight_refuses_new_calls_and_exits(
    gateway: tuple[str, subprocess.Popen[bytes]], redis_url: str, redis: Redis
) -> None:
    addr, process = gateway
    async with grpc.aio.insecure_channel(addr) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)

        async def status() -> Any:
            try:
                return (await health.Check(health_pb2.HealthCheckRequest(), timeout=1)).status
            except grpc.aio.AioRpcError:
                return None

        async def serving() -> bool:
            return await status() == health_pb2.HealthCheckResponse.SERVING

        await _until(serving, timeout_s=30, what="the gateway serves")

        # three streams in flight, each shown its guidance
        calls = [
            stub.GenerateStream(pb.GenerateRequest(query=f"Question {i}?"), timeout=60) for i in range(3)
        ]
        streams = [asyncio.ensure_future(_collect(call)) for call in calls]

        async def all_queued() -> bool:
            return bool(redis.xlen(KEYS.queries) == 3)

        await _until(all_queued, timeout_s=10, what="the three jobs are queued")
        entries: Any = redis.xrange(KEYS.queries)
        # in the calls' order (they may reach the queue in another)
        jobs = sorted((Job.model_validate_json(f[b"job"]) for _, f in entries), key=lambda job: job.query)
        guidance = Guidance(text="g", token_count=1, finish_reason="length")
        await _publish(redis_url, [(job.id, GuidanceEvent(guidance=guidance)) for job in jobs])

        # 1) SIGTERM: NOT_SERVING at once, health still answered
        process.send_signal(signal.SIGTERM)

        async def not_serving() -> bool:
            return await status() == health_pb2.HealthCheckResponse.NOT_SERVING

        await _until(not_serving, timeout_s=2, what="health says NOT_SERVING")

        # 2) a new call is refused, as retryable elsewhere
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(pb.GenerateRequest(query="Too late?"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (refused.value.details() or "")

        # 3) two streams go on and finish within the grace; the third never gets its answer
        for job in jobs[:2]:
            completion = Completion(text="g and the rest", guidance=guidance)
            await _publish(
                redis_url,
                [
                    (job.id, DeltaEvent(text=" and the rest", offset=0)),
                    (job.id, FinalEvent(completion=completion)),
                ],
            )
        outcomes = await asyncio.wait_for(asyncio.gather(*streams), timeout=GRACE_S + 10)

    async def exited() -> bool:
        return process.poll() is not None

    await _until(exited, timeout_s=10, what="the gateway process exits")

    assert outcomes[:2] == [("OK", [" and the rest"])] * 2
    assert outcomes[2][0] in {"CANCELLED", "UNAVAILABLE"}  # cut when the grace ran out
    # 4) the cut call's job is cancelled, so no worker spends time on it, and the process exits cleanly
    assert redis.exists(KEYS.cancelled(jobs[2].id))
    assert not any(redis.exists(KEYS.cancelled(job.id)) for job in jobs[:2])
    assert process.returncode == 0
