"""API keys at the gateway: a real gRPC server on a free port, a real Redis behind it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from services.gateway.auth import ApiKeys, hash_key
from services.gateway.server import Gateway
from services.gateway.settings import GatewaySettings


@pytest.fixture
async def gateway(redis_url: str, tmp_path: Path) -> AsyncIterator[str]:
    keys = tmp_path / "keys"
    keys.write_text(f"# team a\n{hash_key('good-key')}\n")
    addr = f"127.0.0.1:{free_port()}"
    server = Gateway(GatewaySettings(redis_url=redis_url, gateway_addr=addr, gateway_api_keys_file=keys))
    await server.start()
    yield addr
    await server.stop()


async def _generate(addr: str, metadata: tuple[tuple[str, str], ...] | None) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(pb.GenerateRequest(query=""), timeout=10, metadata=metadata)
    return caught.value


@pytest.mark.parametrize(
    "metadata",
    [None, (("authorization", "Bearer wrong-key"),), (("authorization", "good-key"),)],
)
async def test_missing_or_wrong_keys_are_unauthenticated(
    gateway: str, metadata: tuple[tuple[str, str], ...] | None
) -> None:
    error = await _generate(gateway, metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "key" in (error.details() or "")


async def test_a_known_key_reaches_the_api(gateway: str) -> None:
    error = await _generate(gateway, (("authorization", "Bearer good-key"),))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # past authentication, into validation


async def test_health_needs_no_key(gateway: str) -> None:
    async with grpc.aio.insecure_channel(gateway) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_malformed_keys_file_is_refused_with_its_line(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("plain-text-key\n")
    with pytest.raises(ValueError, match="keys:1"):
        ApiKeys.from_file(keys)


def test_a_keys_line_may_name_the_key_and_set_its_own_limits(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(
        f"{hash_key('a')} name=team-a rate=300/m burst=10 concurrency=4 queued=7\n{hash_key('b')}\n"
    )
    api_keys = ApiKeys.from_file(keys)
    team_a = api_keys.check((("authorization", "Bearer a"),))
    assert (team_a.name, team_a.rate_per_s, team_a.burst, team_a.max_concurrent, team_a.max_queued) == (
        "team-a",
        5.0,
        10,
        4,
        7,
    )
    plain = api_keys.check((("authorization", "Bearer b"),))
    # gateway defaults
    assert (plain.rate_per_s, plain.burst, plain.max_concurrent, plain.max_queued) == (None, None, None, None)


@pytest.mark.parametrize("options", ["rate=fast", "burst=-1", "colour=red", "name=a b=c", "rate=1 rate=2"])
def test_a_bad_option_on_a_keys_line_is_refused_with_its_line(tmp_path: Path, options: str) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# keys\n{hash_key('a')} {options}\n")
    with pytest.raises(ValueError, match="keys:2"):
        ApiKeys.from_file(keys)


@pytest.mark.parametrize(
    "line",
    [
        "raw-secret-4471",
        f"{hash_key('a')} raw-secret-4471",
        f"{hash_key('a')} name=raw-secret-4471!",
        f"{hash_key('a')} rate=raw-secret-4471",
        f"{hash_key('a')} queued=raw-secret-4471",
    ],
    ids=["instead-of-a-hash", "after-a-hash", "as-a-name", "as-a-rate", "as-a-count"],
)
def test_a_raw_key_pasted_into_the_keys_file_is_never_echoed(tmp_path: Path, line: str) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{line}\n")
    with pytest.raises(ValueError, match="keys:1") as refused:
        ApiKeys.from_file(keys)
    assert "raw-secret-4471" not in str(refused.value)


async def test_failed_authentications_are_logged_and_counted_per_peer_without_the_key(
    gateway: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.gateway.access")
    for _ in range(2):
        await _generate(gateway, (("authorization", "Bearer guessed-key-5521"),))
    await _generate(gateway, None)
    failures = [r for r in caplog.records if r.getMessage() == "authentication failed"]
    assert [(r.key_id, r.peer, r.peer_failures) for r in failures] == [  # type: ignore[attr-defined]
        ("unknown", "ipv4:127.0.0.1", 1),
        ("unknown", "ipv4:127.0.0.1", 2),
        ("unknown", "ipv4:127.0.0.1", 3),
    ]
    assert "unknown API key" in failures[0].reason  # type: ignore[attr-defined]
    assert "guessed-key-5521" not in caplog.text and all("guessed" not in str(vars(r)) for r in failures)
