"""TLS at the gateway: plaintext refused, clients that trust its CA served, mutual TLS, and the plaintext
health port for probes.

Real gRPC gateways on free ports, a real Redis behind them, certificates made with `openssl`.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from services.gateway.server import Gateway
from services.gateway.settings import GatewaySettings
from tests.certificates import make_certificates


async def _start(redis_url: str, **overrides: object) -> Gateway:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "gateway_addr": f"127.0.0.1:{free_port()}",
        "gateway_metrics_port": 0,
    }
    gateway = Gateway(GatewaySettings(**(values | overrides)))  # type: ignore[arg-type]
    await gateway.start()
    return gateway


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("tls"))


async def _health(addr: str, credentials: grpc.ChannelCredentials | None) -> int:
    channel = grpc.aio.secure_channel(addr, credentials) if credentials else grpc.aio.insecure_channel(addr)
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


async def test_tls_serves_clients_that_trust_its_ca_and_refuses_plaintext(
    redis_url: str, certificates: Path
) -> None:
    gateway = await _start(
        redis_url,
        gateway_tls_cert_file=certificates / "server.pem",
        gateway_tls_key_file=certificates / "server.key",
        gateway_health_addr=f"127.0.0.1:{free_port()}",
    )
    addr = gateway.settings.gateway_addr
    try:
        trusted = grpc.ssl_channel_credentials(root_certificates=(certificates / "ca.pem").read_bytes())
        assert await _health(addr, trusted) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as plaintext:
            await _health(addr, None)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE

        # The probes' port: health in plaintext, and nothing else.
        probes = gateway.settings.gateway_health_addr
        assert await _health(probes, None) == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(probes) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as api:
                await guidance_pb2_grpc.GuidanceServiceStub(channel).Generate(
                    pb.GenerateRequest(query="q"), timeout=5
                )
        assert api.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await gateway.stop()


async def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(
    redis_url: str, certificates: Path
) -> None:
    gateway = await _start(
        redis_url,
        gateway_tls_cert_file=certificates / "server.pem",
        gateway_tls_key_file=certificates / "server.key",
        gateway_tls_client_ca_file=certificates / "ca.pem",
    )
    addr, ca = gateway.settings.gateway_addr, (certificates / "ca.pem").read_bytes()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await _health(addr, grpc.ssl_channel_credentials(root_certificates=ca))
        assert anonymous.value.code() == grpc.StatusCode.UNAVAILABLE
        with_certificate = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(certificates / "client.key").read_bytes(),
            certificate_chain=(certificates / "client.pem").read_bytes(),
        )
        assert await _health(addr, with_certificate) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await gateway.stop()


def test_tls_settings_refuse_a_certificate_without_its_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        GatewaySettings(gateway_tls_cert_file=tmp_path / "server.pem")
    with pytest.raises(ValueError, match="mutual TLS"):
        GatewaySettings(gateway_tls_client_ca_file=tmp_path / "ca.pem")
