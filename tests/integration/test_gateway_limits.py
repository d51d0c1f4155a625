"""The gateway's server limits: request size, RPCs per connection, idle and old connections.

A real gateway and a real Redis on free ports, no teacher: valid requests wait in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from redis import Redis

from gkt.keys import Keys
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from services.gateway.auth import hash_key
from services.gateway.server import Gateway
from services.gateway.settings import GatewaySettings

BEARER = (("authorization", "Bearer team-a-key"),)
KEYS = Keys("limits")


@contextlib.asynccontextmanager
async def _gateway(redis_url: str, **overrides: object) -> AsyncIterator[GatewaySettings]:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "gateway_addr": f"127.0.0.1:{free_port()}",
        "gateway_metrics_port": 0,
        "key_prefix": KEYS.prefix,
    }
    gateway = Gateway(GatewaySettings(**{**values, **overrides}))  # type: ignore[arg-type]
    await gateway.start()
    try:
        yield gateway.settings
    finally:
        await gateway.stop()


async def _code(
    channel: grpc.aio.Channel,
    request: pb.GenerateRequest,
    metadata: tuple[tuple[str, str], ...] = BEARER,
    timeout_s: float = 10,
) -> grpc.aio.AioRpcError:
    stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(request, timeout=timeout_s, metadata=metadata)
    return caught.value


async def _until(check: Callable[[], object], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_the_longest_valid_request_is_read_and_a_longer_one_is_refused_unparsed(
    redis_url: str, redis: Redis, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{hash_key('team-a-key')} name=team-a\n")
    async with (
        _gateway(redis_url, gateway_api_keys_file=keys) as settings,
        grpc.aio.insecure_channel(settings.gateway_addr) as channel,
    ):
        # every string at its longest, in 4-byte characters: parsed, then refused for its unknown task
        longest = pb.GenerateRequest(
            query="𝔸" * settings.gateway_max_query_chars,
            task=99,  # type: ignore[arg-type]
            request_id="r" * 128,
            sampling=pb.SamplingParams(
                stop=["𝔹" * settings.gateway_max_stop_chars] * settings.gateway_max_stop_sequences
            ),
        )
        assert longest.ByteSize() <= settings.max_request_bytes
        refused = await _code(channel, longest)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (refused.details() or "").startswith("task")

        oversized = pb.GenerateRequest(query="x" * (settings.max_request_bytes + 1))
        assert (await _code(channel, oversized)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # refused by size before anything else, the caller's key included
        assert (await _code(channel, oversized, metadata=())).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # a stranger's request is never parsed: bytes that are not UTF-8 are not even noticed
        undecodable = b"\x0a\x02\xff\xfe"  # field 1 (query), 2 bytes, not UTF-8
        unparsed = channel.unary_unary(
            "/gkt.v1.GuidanceService/Generate",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as stranger:
            await unparsed(undecodable, timeout=10)
        assert stranger.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as known:
            await unparsed(undecodable, timeout=10, metadata=BEARER)
        assert known.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # parsed once the caller is known


def test_a_request_size_below_the_longest_valid_request_is_refused_naming_the_values() -> None:
    with pytest.raises(ValueError, match="gateway_max_request_bytes=1000 would refuse valid requests"):
        GatewaySettings(gateway_max_request_bytes=1000)


async def test_a_connection_carries_at_most_max_concurrent_streams(redis_url: str, redis: Redis) -> None:
    async with (
        _gateway(redis_url, gateway_max_concurrent_streams=2) as settings,
        grpc.aio.insecure_channel(settings.gateway_addr) as busy,
        # its own subchannel pool: channels to one address otherwise share one connection
        grpc.aio.insecure_channel(
            settings.gateway_addr, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as other,
    ):
        stub = guidance_pb2_grpc.GuidanceServiceStub(busy)
        waiting = [stub.GenerateStream(pb.GenerateRequest(query=f"wait {i}"), timeout=30) for i in range(2)]
        await _until(lambda: redis.xlen(KEYS.queries) == 2)
        # a third call on the same connection gets no stream until one ends: its deadline passes first
        queued = await _code(busy, pb.GenerateRequest(query=""), metadata=(), timeout_s=1)
        assert queued.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the same call on another connection is served at once (and refused for its empty query)
        served = await _code(other, pb.GenerateRequest(query=""), metadata=())
        assert served.code() == grpc.StatusCode.INVALID_ARGUMENT
        waiting[0].cancel()
        served = await _code(busy, pb.GenerateRequest(query=""), metadata=())
        assert served.code() == grpc.StatusCode.INVALID_ARGUMENT
        waiting[1].cancel()


async def test_an_idle_connection_is_closed_by_the_gateway(redis_url: str, redis: Redis) -> None:
    async with (
        _gateway(redis_url, gateway_max_connection_idle_s=0.5) as settings,
        grpc.aio.insecure_channel(settings.gateway_addr) as channel,
    ):
        await _code(channel, pb.GenerateRequest(query=""), metadata=())
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        # the client's own idle timeout is 30 minutes: only the gateway's GOAWAY makes it idle this soon
        await _until(lambda: channel.get_state() == grpc.ChannelConnectivity.IDLE)


async def test_an_old_connection_is_asked_to_close_while_its_call_still_runs(
    redis_url: str, redis: Redis
) -> None:
    async with (
        _gateway(redis_url, gateway_max_connection_age_s=1.0) as settings,
        grpc.aio.insecure_channel(settings.gateway_addr) as channel,
    ):
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
        call = stub.GenerateStream(pb.GenerateRequest(query="a long wait"), timeout=30)
        await _until(lambda: redis.xlen(KEYS.queries) == 1)
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        # not idle (a call is open), yet the gateway sends GOAWAY once the connection is old
        await _until(lambda: channel.get_state() != grpc.ChannelConnectivity.READY)
        assert not call.done()  # the call on it runs on, within the grace
        call.cancel()
