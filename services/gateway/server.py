"""Building the gRPC server (API, health, reflection) and shutting it down gracefully."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gkt.connections import connect_bounded
from gkt.keys import Keys
from gkt.v1 import guidance_pb2, guidance_pb2_grpc
from services.gateway.access import AccessInterceptor, Limiter
from services.gateway.auth import ApiKeys
from services.gateway.deadline import DEADLINE_SLACK_S, DeadlineInterceptor
from services.gateway.errors import ErrorMappingInterceptor
from services.gateway.interceptors import InFlightLimitInterceptor, MetricsInterceptor
from services.gateway.service import COMMANDS_CLIENT_NAME, GatewayService
from services.gateway.servicer import GuidanceServicer
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

_SAMPLER_STOP_S = 5.0
"""How long a stopping gateway waits for the queue sampler's Redis round trip in flight."""

SERVICE_NAME = guidance_pb2.DESCRIPTOR.services_by_name["GuidanceService"].full_name


class Gateway:
    """A running gateway: the server, its health servicer, and the background queue sampler."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.redis = connect_bounded(
            settings.redis_url,
            max_connections=settings.gateway_redis_max_connections,
            wait_s=settings.gateway_redis_wait_s,
            client_name=COMMANDS_CLIENT_NAME,
        )
        self.service = GatewayService(settings=settings, redis=self.redis)
        api_keys = (
            ApiKeys.from_file(settings.gateway_api_keys_file) if settings.gateway_api_keys_file else None
        )
        access = AccessInterceptor(
            settings=settings,
            api_keys=api_keys,
            limiter=Limiter(redis=self.redis, keys=Keys(settings.key_prefix)),
        )
        # Outermost first. The deadline is outside everything, so a call stuck writing to a client that
        # does not read is cut too. Metrics record the status the error mapping chose, and the error
        # mapping maps what access control raises, so refusals are counted by their status code too. The
        # in-flight cap comes before access control: a refused call costs no Redis round trip.
        self.calls = InFlightLimitInterceptor(max_in_flight=settings.gateway_max_in_flight)
        interceptors = [
            DeadlineInterceptor(default_timeout_s=settings.gateway_default_timeout_s),
            MetricsInterceptor(),
            ErrorMappingInterceptor(),
            self.calls,
            access,
        ]
        self.server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
        guidance_pb2_grpc.add_GuidanceServiceServicer_to_server(
            GuidanceServicer(service=self.service, settings=settings), self.server
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = _listen(self.server, settings)
        # Probes cannot speak TLS: with a health address, the same health status is served there in
        # plaintext, and nothing else is.
        self.health_server: grpc.aio.Server | None = None
        self.health_port = 0
        if settings.gateway_health_addr:
            self.health_server = grpc.aio.server(options=server_options(settings))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(settings.gateway_health_addr)
        self._sampler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        self._sampler = asyncio.create_task(self.service.sample_queues())
        await self._set_serving(True)
        log.info(
            "gateway serving",
            extra={
                "addr": self.settings.gateway_addr,
                "port": self.port,
                "tls": bool(self.settings.gateway_tls_cert_file),
                "health_port": self.health_port or None,
            },
        )

    async def stop(self) -> None:
        """Drain, then stop.

        1) health says NOT_SERVING at once, and keeps being served, so probes and load balancers see it;
        2) new API calls are refused (UNAVAILABLE: a client retries them on another replica); 3) the calls
        in flight, streams too, get `gateway_grace_s` to finish; 4) whatever still runs then is cancelled
        (its job with it) and the server stops.
        """
        await self._set_serving(False)
        self.calls.drain()
        log.info("gateway draining", extra={"in_flight": self.calls.in_flight})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.gateway_grace_s
        try:
            await asyncio.wait_for(self.calls.drained(), timeout=self.settings.gateway_grace_s)
        except TimeoutError:
            log.warning(
                "grace period over: cancelling the calls still in flight",
                extra={"in_flight": self.calls.in_flight},
            )
        # what is left of the grace lets the last replies reach their clients; none left cancels the rest
        await self.server.stop(max(0.0, deadline - loop.time()))
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.service.close()  # ends the queue sampler at its next step
        if self._sampler:
            await asyncio.wait({self._sampler}, timeout=_SAMPLER_STOP_S)
            self._sampler.cancel()
        await self.redis.aclose()

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)


def server_options(settings: GatewaySettings) -> list[tuple[str, int]]:
    """gRPC core's limits: request size (checked before a request is parsed), RPCs per connection, and how
    long a connection may stay idle or open."""
    age_ms = int(settings.gateway_max_connection_age_s * 1000)
    return [
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        # gRPC core drops calls that arrive while it holds this many not yet handed to the server (1,000
        # and 3,000 by default, dropped at random in between, as CANCELLED): a burst up to the in-flight cap
        # waits its turn instead; beyond the cap, calls are refused as RESOURCE_EXHAUSTED.
        ("grpc.server.max_pending_requests", 2 * settings.gateway_max_in_flight),
        ("grpc.server.max_pending_requests_hard_limit", 2 * settings.gateway_max_in_flight),
        ("grpc.max_concurrent_streams", settings.gateway_max_concurrent_streams),
        ("grpc.max_connection_idle_ms", int(settings.gateway_max_connection_idle_s * 1000)),
        ("grpc.max_connection_age_ms", age_ms),
        # the RPCs still open on an aged connection end by their deadline anyway
        (
            "grpc.max_connection_age_grace_ms",
            int((settings.gateway_default_timeout_s + DEADLINE_SLACK_S) * 1000),
        ),
    ]


def _listen(server: grpc.aio.Server, settings: GatewaySettings) -> int:
    """Open the gRPC port: TLS when a certificate is configured (mutual TLS with a client CA)."""
    if settings.gateway_tls_cert_file is None or settings.gateway_tls_key_file is None:
        return server.add_insecure_port(settings.gateway_addr)
    client_ca = settings.gateway_tls_client_ca_file
    credentials = grpc.ssl_server_credentials(
        [(settings.gateway_tls_key_file.read_bytes(), settings.gateway_tls_cert_file.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )
    return server.add_secure_port(settings.gateway_addr, credentials)
