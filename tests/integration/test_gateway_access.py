"""Access control at the gateway: per-key limits in Redis, and secrets kept out of logs (TLS: test_gateway_tls.py).

Real gRPC gateways on free ports, a real Redis behind them, certificates made with `openssl`.
"""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY
from redis import Redis

from gkt.connections import connect_async
from gkt.jobs import DeltaEvent, Guidance, GuidanceEvent, Job
from gkt.keys import Keys
from gkt.logs import JsonFormatter
from gkt.queue import AnyEvent, publish_events
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from services.gateway.auth import hash_key
from services.gateway.limits import Limiter
from services.gateway.server import Gateway
from services.gateway.settings import GatewaySettings

BEARER = (("authorization", "Bearer team-a-key"),)
EMPTY = pb.GenerateRequest(query="")  # passes access control, then fails validation: cheap to send


def _keys_file(tmp_path: Path, options: str = "") -> Path:
    path = tmp_path / "keys"
    path.write_text(f"{hash_key('team-a-key')} name=team-a {options}\n{hash_key('team-b-key')} name=team-b\n")
    return path


async def _start(settings: GatewaySettings) -> Gateway:
    gateway = Gateway(settings)
    await gateway.start()
    return gateway


def _settings(redis_url: str, **overrides: object) -> GatewaySettings:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "gateway_addr": f"127.0.0.1:{free_port()}",
        "gateway_metrics_port": 0,
    }
    values.update(overrides)
    return GatewaySettings(**values)  # type: ignore[arg-type]


async def _status(
    addr: str,
    metadata: tuple[tuple[str, str], ...] = BEARER,
    request: pb.GenerateRequest = EMPTY,
    timeout_s: float = 10,
) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(request, timeout=timeout_s, metadata=metadata)
    return caught.value


@pytest.fixture
async def limited(redis_url: str, redis: Redis, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """Two gateway replicas sharing one Redis; team-a may send 1/s with a burst of 2, team-b 100/s."""
    keys = _keys_file(tmp_path, "rate=1/s burst=2")
    first = await _start(_settings(redis_url, gateway_api_keys_file=keys, gateway_key_rate_per_s=100))
    second = await _start(_settings(redis_url, gateway_api_keys_file=keys, gateway_key_rate_per_s=100))
    yield first.settings.gateway_addr, second.settings.gateway_addr
    await first.stop()
    await second.stop()


async def test_a_key_over_its_rate_gets_resource_exhausted_on_every_replica(limited: tuple[str, str]) -> None:
    first, second = limited
    assert (await _status(first)).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await _status(second)).code() == grpc.StatusCode.INVALID_ARGUMENT
    refused = await _status(first)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "team-a" in (refused.details() or "")
    refused = await _status(second)  # the budget is shared: the other replica refuses too
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # another key has its own budget (the gateway default of 100/s)
    other = await _status(first, (("authorization", "Bearer team-b-key"),))
    assert other.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_rate_refusal_says_when_to_retry_and_which_quota(limited: tuple[str, str]) -> None:
    first, _ = limited
    for _ in range(2):
        await _status(first)
    refused = await _status(first)
    status = rpc_status.from_call(refused)
    assert status is not None and status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    retry, quota = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
    assert any(detail.Unpack(retry) for detail in status.details)
    assert any(detail.Unpack(quota) for detail in status.details)
    assert 0 < retry.retry_delay.ToMilliseconds() <= 1000
    assert quota.violations[0].subject == "api_key:team-a:rate"
    await asyncio.sleep(retry.retry_delay.ToMilliseconds() / 1000 + 0.05)
    assert (await _status(first)).code() == grpc.StatusCode.INVALID_ARGUMENT  # the bucket refilled


async def test_refusals_are_counted_by_status_code(limited: tuple[str, str]) -> None:
    def count(code: str) -> float:
        labels = {"rpc": "Generate", "code": code}
        return REGISTRY.get_sample_value("gkt_gateway_requests_total", labels) or 0.0

    first, _ = limited
    exhausted, unauthenticated = count("RESOURCE_EXHAUSTED"), count("UNAUTHENTICATED")
    for _ in range(3):
        await _status(first)
    await _status(first, (("authorization", "Bearer nobody"),))
    assert count("RESOURCE_EXHAUSTED") == exhausted + 1
    assert count("UNAUTHENTICATED") == unauthenticated + 1


async def test_concurrent_requests_beyond_a_keys_limit_are_refused_until_one_ends(
    redis_url: str, redis: Redis, tmp_path: Path
) -> None:
    gateway = await _start(_settings(redis_url, gateway_api_keys_file=_keys_file(tmp_path, "concurrency=1")))
    addr = gateway.settings.gateway_addr
    try:
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
            # No teacher runs: this valid request waits for its answer, holding the key's one lease.
            waiting = stub.GenerateStream(
                pb.GenerateRequest(query="What is 2+2?"), timeout=30, metadata=BEARER
            )
            await _until(lambda: redis.zcard(Keys().leases(_key_id("team-a-key"))) == 1)
            refused = await _status(addr)
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "in flight" in (refused.details() or "")
            waiting.cancel()
            await _until(lambda: redis.zcard(Keys().leases(_key_id("team-a-key"))) == 0)
            assert (await _status(addr)).code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await gateway.stop()


async def test_leases_of_a_gateway_that_died_expire_at_the_request_deadline(
    redis_url: str, redis: Redis
) -> None:
    client = connect_async(redis_url)
    limiter = Limiter(redis=client, keys=Keys())
    try:
        held = await limiter.acquire("k1", limit=1, ttl_s=0.3)  # never released, as if its gateway died
        assert held is not None
        assert await limiter.acquire("k1", limit=1, ttl_s=0.3) is None
        await asyncio.sleep(0.4)
        assert await limiter.acquire("k1", limit=1, ttl_s=0.3) is not None
        assert 0 < redis.pttl(Keys().leases("k1")) <= 300  # nothing outlives the last deadline
    finally:
        await client.aclose()


async def test_stalled_readers_keep_their_leases_and_end_at_the_servers_default_deadline(
    redis_url: str, redis: Redis, tmp_path: Path
) -> None:
    """Two streams whose client sets no deadline and never reads, under a limit of 2 concurrent calls.

    Their jobs' events are published as a student would, far more than gRPC buffers, so the gateway
    waits in flow control; the leases (TTL 0.6 s) must outlive several TTLs, and the server must end
    both calls at its default deadline all the same.
    """
    settings = _settings(
        redis_url,
        gateway_api_keys_file=_keys_file(tmp_path, "concurrency=2"),
        gateway_lease_ttl_s=0.6,
        gateway_default_timeout_s=4,
    )
    gateway = await _start(settings)
    leases = Keys().leases(_key_id("team-a-key"))
    publisher = connect_async(redis_url)
    try:
        async with grpc.aio.insecure_channel(settings.gateway_addr) as channel:
            stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
            stalled = [
                stub.GenerateStream(pb.GenerateRequest(query=f"stalled {i}"), metadata=BEARER)
                for i in range(2)
            ]
            await _until(lambda: redis.xlen(Keys().queries) == 2)
            entries: Any = redis.xrange(Keys().queries)
            guidance = Guidance(text="", token_count=0)
            for _, fields in entries:
                job = Job.model_validate_json(fields[b"job"])
                deltas: list[tuple[str, AnyEvent]] = [
                    (job.id, DeltaEvent(text="x" * 65_536, offset=65_536 * i)) for i in range(300)
                ]
                await publish_events(
                    publisher,
                    keys=Keys(),
                    events=[(job.id, GuidanceEvent(guidance=guidance)), *deltas],
                    ttl_s=60,
                )
            await asyncio.sleep(2)  # three lease TTLs
            refused = await _status(settings.gateway_addr)
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # both leases were renewed
            await _until(lambda: redis.zcard(leases) == 0, timeout_s=20)  # released when the calls ended
            for call in stalled:
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    async for _ in call:
                        pass
                assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "call's deadline (4 s)" in (
                    ended.value.details() or ""
                )  # cut while it waited to write
            assert (await _status(settings.gateway_addr)).code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await publisher.aclose()
        await gateway.stop()


async def test_without_a_keys_file_every_caller_shares_the_default_budget(
    redis_url: str, redis: Redis
) -> None:
    gateway = await _start(_settings(redis_url, gateway_key_rate_per_s=0.5, gateway_key_burst=1))
    try:
        addr = gateway.settings.gateway_addr
        assert (await _status(addr, ())).code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (await _status(addr, ())).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await gateway.stop()


def _key_id(key: str) -> str:
    return hash_key(key).removeprefix("sha256:")[:16]


async def _until(check: object, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


# --- TLS -------------------------------------------------------------------------------------------


# --- secrets in logs -------------------------------------------------------------------------------


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of our own that demands a password; yields its URL without the password."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--requirepass", "pw-s3cret-9f2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                Redis(port=port, password="pw-s3cret-9f2").ping()
                break
            except Exception:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every log line, as the services write them (JSON, INFO and above)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(service="gateway"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.mark.parametrize("via_file", [False, True], ids=["password-in-url", "password-file"])
async def test_no_key_password_or_query_text_reaches_the_logs(
    password_redis: str, tmp_path: Path, captured_logs: io.StringIO, via_file: bool
) -> None:
    if via_file:
        (tmp_path / "redis-password").write_text("pw-s3cret-9f2\n")
        url, url_settings = password_redis, {"redis_password_file": tmp_path / "redis-password"}
    else:
        url, url_settings = password_redis.replace("redis://", "redis://:pw-s3cret-9f2@"), {}
    settings = _settings(
        url, gateway_api_keys_file=_keys_file(tmp_path), gateway_key_rate_per_s=1, **url_settings
    )
    logging.getLogger("gkt.gateway").info("settings %s", settings.describe())
    gateway = await _start(settings)
    try:
        query = pb.GenerateRequest(query="my private question about zebra-ledger-7731")
        # enqueued (so the password worked), then no teacher answers before the deadline
        expired = await _status(gateway.settings.gateway_addr, request=query, timeout_s=1)
        assert expired.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await gateway.stop()
    text = captured_logs.getvalue()
    assert "job enqueued" in text and "team-a" in text  # the request was logged, with its key's name
    for secret in ("pw-s3cret-9f2", "team-a-key", "zebra-ledger-7731"):
        assert secret not in text
