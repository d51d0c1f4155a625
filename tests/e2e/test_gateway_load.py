"""The gateway under many calls at once, on the zero-cost echo backends: a bounded number of Redis
connections whatever the calls in flight, and RESOURCE_EXHAUSTED (never UNAVAILABLE) past its cap.

Real processes: a private redis-server, the echo teacher, two Celery students and the gateway.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from redis import Redis

from gkt.keys import Keys
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from gkt_tools.stack import Stack

CALLS = 2000
MAX_CONNECTIONS = 16
STREAMS_PER_CONNECTION = 200
ECHO_ENV = {
    "GKT_TEACHER_BACKEND": "echo-benchmark-only",
    "GKT_STUDENT_MODEL": "echo-benchmark-only",
    "GKT_STUDENT_WARMUP": "false",
    "GKT_TEACHER_MAX_BATCH_SIZE": "256",
    "GKT_TEACHER_MAX_WAIT_MS": "5",
    "GKT_LOG_LEVEL": "WARNING",
    "GKT_KEY_PREFIX": "load",
    "GKT_GATEWAY_MAX_IN_FLIGHT": str(CALLS),
    "GKT_GATEWAY_MAX_QUEUE_DEPTH": str(2 * CALLS),
    "GKT_GATEWAY_KEY_MAX_QUEUED": "0",
    "GKT_GATEWAY_MAX_CONCURRENT_STREAMS": str(2 * STREAMS_PER_CONNECTION),
    "GKT_GATEWAY_REDIS_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "GKT_GATEWAY_METRICS_PORT": "0",
    "GKT_TEACHER_METRICS_PORT": "0",
    "GKT_STUDENT_METRICS_PORT": "0",
}
REQUEST = pb.GenerateRequest(
    query="How many calls can one gateway follow?",
    guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=4),
    sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=8, seed=1),
)


@pytest.fixture(scope="module")
def echo_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        state_dir=tmp_path_factory.mktemp("load"),
        env=ECHO_ENV,
        students=2,
        gateway_addr=f"127.0.0.1:{free_port()}",
    )
    stack.start(timeout_s=180)
    yield stack
    stack.stop()


def gateway_connections(redis: Redis) -> int:
    """The gateway's connections to Redis, by the names it gives them (its command pool and its reader)."""
    clients = redis.client_list()
    return sum(1 for client in clients if str(client.get("name", "")).startswith("gkt-gateway"))


async def _stream(stub: guidance_pb2_grpc.GuidanceServiceStub, *, timeout_s: float = 240) -> str:
    """One streaming call to its end: "OK" when the final answer came, else the status code's name."""
    try:
        async for reply in stub.GenerateStream(REQUEST, timeout=timeout_s):
            if reply.HasField("final"):
                return "OK"
        return "NO_FINAL"
    except grpc.aio.AioRpcError as error:
        return error.code().name


async def _until(condition: object, *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting until {what}")
        await asyncio.sleep(0.1)


async def test_thousands_of_streams_hold_a_bounded_number_of_redis_connections_and_all_complete(
    echo_stack: Stack,
) -> None:
    redis = Redis.from_url(echo_stack.redis_url or "")
    teacher = echo_stack.processes["teacher"].pid
    queries = Keys("load").queries
    channels = [
        grpc.aio.insecure_channel(
            echo_stack.gateway_addr or "", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(CALLS // STREAMS_PER_CONNECTION + 1)
    ]
    stubs = [guidance_pb2_grpc.GuidanceServiceStub(channel) for channel in channels]
    peak = 0
    try:
        # The teacher is paused until every call has its job queued: all CALLS are in flight at once.
        os.kill(teacher, signal.SIGSTOP)
        calls = [asyncio.ensure_future(_stream(stubs[i % (len(stubs) - 1)])) for i in range(CALLS)]

        def all_queued() -> bool:
            nonlocal peak
            peak = max(peak, gateway_connections(redis))
            return redis.xlen(queries) >= CALLS

        await _until(all_queued, timeout_s=180, what=f"{CALLS} jobs are queued")

        # One call past the cap is refused at once, as overload.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs[-1].GenerateStream(REQUEST, timeout=30).read()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{CALLS} calls at once" in (refused.value.details() or "")

        os.kill(teacher, signal.SIGCONT)
        pending = set(calls)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=0.2)
            peak = max(peak, gateway_connections(redis))
        outcomes = Counter(call.result() for call in calls)
    finally:
        os.kill(teacher, signal.SIGCONT)
        for channel in channels:
            await channel.close()
    assert outcomes == {"OK": CALLS}
    # the command pool, plus the one connection of the event reader
    assert 0 < peak <= MAX_CONNECTIONS + 1, peak
    redis.close()


async def _burst(stubs: list[guidance_pb2_grpc.GuidanceServiceStub], n: int) -> Counter[str]:
    return Counter(await asyncio.gather(*(_stream(stubs[i % len(stubs)]) for i in range(n))))


async def test_a_burst_after_a_redis_restart_meets_no_dead_connection(echo_stack: Stack) -> None:
    channels = [grpc.aio.insecure_channel(echo_stack.gateway_addr or "") for _ in range(2)]
    stubs = [guidance_pb2_grpc.GuidanceServiceStub(channel) for channel in channels]
    try:
        # every pooled connection and the reader's are in use, then Redis restarts under them
        assert await _burst(stubs, 200) == {"OK": 200}
        echo_stack.kill("redis", signal.SIGTERM)
        echo_stack.restart("redis")
        redis = Redis.from_url(echo_stack.redis_url or "")
        await _until(lambda: _answers(redis), timeout_s=30, what="redis answers again")
        # the workers reconnect too (the teacher recreates its consumer group): one call is answered
        deadline = time.monotonic() + 60
        while (outcome := await _stream(stubs[0], timeout_s=10)) != "OK":
            assert time.monotonic() < deadline, f"no call answered since the restart (last: {outcome})"
            await asyncio.sleep(0.2)

        assert await _burst(stubs, 200) == {"OK": 200}
    finally:
        for channel in channels:
            await channel.close()


def _answers(redis: Redis) -> bool:
    try:
        return bool(redis.ping())
    except Exception:
        return False
