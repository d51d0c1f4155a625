"""Building the gRPC server (API, health, reflection) and shutting it down gracefully."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gkt.queue import connect_async
from gkt.v1 import guidance_pb2, guidance_pb2_grpc
from services.gateway.auth import ApiKeys
from services.gateway.interceptors import ErrorMappingInterceptor
from services.gateway.service import GatewayService
from services.gateway.servicer import GuidanceServicer
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

SERVICE_NAME = guidance_pb2.DESCRIPTOR.services_by_name["GuidanceService"].full_name


class Gateway:
    """A running gateway: the server, its health servicer, and the background queue sampler."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.redis = connect_async(settings.redis_url)
        self.service = GatewayService(settings=settings, redis=self.redis)
        api_keys = (
            ApiKeys.from_file(settings.gateway_api_keys_file) if settings.gateway_api_keys_file else None
        )
        self.server = grpc.aio.server(interceptors=[ErrorMappingInterceptor(api_keys=api_keys)])
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
        self.port = self.server.add_insecure_port(settings.gateway_addr)
        self._sampler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        self._sampler = asyncio.create_task(self.service.sample_queues())
        await self._set_serving(True)
        log.info("gateway serving", extra={"addr": self.settings.gateway_addr, "port": self.port})

    async def stop(self) -> None:
        """Report NOT_SERVING (load balancers drain), then let in-flight RPCs finish within the grace."""
        await self._set_serving(False)
        await self.server.stop(self.settings.gateway_grace_s)
        if self._sampler:
            self._sampler.cancel()
        await self.redis.aclose()

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
