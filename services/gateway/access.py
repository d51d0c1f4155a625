"""Who may call the API and how much: the interceptor that checks a call's API key, enforces its key's rate
and concurrency limits (`services.gateway.limits`) and refuses undecodable requests (`services.gateway.wire`).

A caller without a valid key is refused before its request is parsed.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2

from gkt import logs, metrics
from gkt.errors import InvalidArgument, ResourceExhausted, StatusCode, Unauthenticated
from gkt.v1 import guidance_pb2
from services.gateway import tenancy
from services.gateway.auth import ANONYMOUS, ApiKey, ApiKeys
from services.gateway.errors import rich_status
from services.gateway.limits import Limiter, Limits
from services.gateway.settings import GatewaySettings
from services.gateway.wire import Undecodable, tolerant

log = logging.getLogger(__name__)

_SERVICE = guidance_pb2.DESCRIPTOR.services_by_name["GuidanceService"]
_PREFIX = f"/{_SERVICE.full_name}/"

_FAILED_PEERS_KEPT = 10_000
"""Peers whose failed authentications are counted (the least recent are forgotten first)."""


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates the caller, enforces its key's limits, and refuses undecodable requests.

    Install it after the error-mapping interceptor: what it raises is then mapped and counted there.
    """

    def __init__(self, *, settings: GatewaySettings, api_keys: ApiKeys | None, limiter: Limiter) -> None:
        self.settings = settings
        self.api_keys = api_keys
        self.limiter = limiter
        self._failures: OrderedDict[str, int] = OrderedDict()
        """Failed authentications per peer address (host, without the port)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(_PREFIX):
            return handler
        # 1) who is calling: decided from the metadata alone, so a stranger's request is never parsed
        try:
            key = (
                self.api_keys.check(handler_call_details.invocation_metadata) if self.api_keys else ANONYMOUS
            )
        except Unauthenticated as refusal:
            return _rebuilt(
                handler, unary=self._refused(refusal), stream=_streamed(self._refused(refusal)), parse=_unread
            )
        request_type = _SERVICE.methods_by_name[method.removeprefix(_PREFIX)].input_type
        return _rebuilt(
            handler,
            unary=self._unary(handler.unary_unary, key) if handler.unary_unary else None,
            stream=self._stream(handler.unary_stream, key) if handler.unary_stream else None,
            parse=tolerant(handler.request_deserializer, request_type),
        )

    def _unary(self, behaviour: Callable[..., Awaitable[Any]], key: ApiKey) -> Callable[..., Awaitable[Any]]:
        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            lease = await self._admit(request, context, key)
            async with self.limiter.holding(key.key_id, lease, ttl_s=self.settings.gateway_lease_ttl_s):
                return await behaviour(request, context)

        return admitted

    def _stream(
        self, behaviour: Callable[..., AsyncGenerator[Any, None]], key: ApiKey
    ) -> Callable[..., AsyncGenerator[Any, None]]:
        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
            lease = await self._admit(request, context, key)
            async with (
                self.limiter.holding(key.key_id, lease, ttl_s=self.settings.gateway_lease_ttl_s),
                contextlib.aclosing(behaviour(request, context)) as replies,
            ):
                async for reply in replies:
                    yield reply

        return admitted

    def _refused(self, refusal: Unauthenticated) -> Callable[..., Awaitable[Any]]:
        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            peer = _host(context.peer())
            self._failures[peer] = self._failures.pop(peer, 0) + 1
            while len(self._failures) > _FAILED_PEERS_KEPT:
                self._failures.popitem(last=False)
            metrics.GATEWAY_REJECTED.labels("unauthenticated").inc()
            log.warning(
                "authentication failed",
                extra={
                    "key_id": "unknown",
                    "peer": peer,
                    "peer_failures": self._failures[peer],
                    "reason": refusal.message,
                },
            )
            raise refusal

        return refuse

    async def _admit(self, request: Any, context: grpc.aio.ServicerContext, key: ApiKey) -> str | None:
        """2) is the request readable, 3) within the key's rate, 4) and concurrency; returns the lease."""
        if self.api_keys is not None:
            logs.bind(key_name=key.name)
        if isinstance(request, Undecodable):
            raise InvalidArgument(request.field, "could not be decoded (strings must be UTF-8)")
        limits = Limits.of(key, self.settings)
        tenancy.enter(tenancy.Tenant(id=key.key_id, name=key.name, max_queued=limits.max_queued))
        if limits.rate_per_s > 0:
            wait_s = await self.limiter.take(key.key_id, rate_per_s=limits.rate_per_s, burst=limits.burst)
            if wait_s > 0:
                metrics.GATEWAY_REJECTED.labels("rate_limited").inc()
                _refuse(
                    context,
                    key=key,
                    message=f"API key {key.name!r} is over its rate of {limits.rate_per_s:g}/s "
                    f"(burst {limits.burst}); retry in {wait_s:.3f} s",
                    subject="rate",
                    retry_after_s=wait_s,
                )
        if limits.max_concurrent <= 0:
            return None
        lease = await self.limiter.acquire(
            key.key_id, limit=limits.max_concurrent, ttl_s=self.settings.gateway_lease_ttl_s
        )
        if lease is None:
            metrics.GATEWAY_REJECTED.labels("concurrency_limited").inc()
            _refuse(
                context,
                key=key,
                message=f"API key {key.name!r} already has {limits.max_concurrent} requests in flight",
                subject="concurrency",
                retry_after_s=None,
            )
        return lease


def _rebuilt(
    handler: grpc.RpcMethodHandler,
    *,
    unary: Callable[..., Awaitable[Any]] | None,
    stream: Callable[..., AsyncGenerator[Any, None]] | None,
    parse: Callable[[bytes], Any],
) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour and request parser replaced (the reply serializer kept)."""
    if handler.unary_unary and unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=parse, response_serializer=handler.response_serializer
        )
    if handler.unary_stream and stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=parse, response_serializer=handler.response_serializer
        )
    return handler


def _streamed(behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., AsyncGenerator[Any, None]]:
    """A streaming form of a behaviour that always raises."""

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
        await behaviour(request, context)
        yield  # never reached: `behaviour` raises

    return stream


def _unread(data: bytes) -> None:
    """The parser of a refused caller's request: its bytes are dropped unparsed."""


def _host(peer: str) -> str:
    """The address of a gRPC peer without its port: `ipv4:10.0.0.7:5123` → `ipv4:10.0.0.7`."""
    return peer.rsplit(":", 1)[0] if peer.count(":") > 1 else peer


def _refuse(
    context: grpc.aio.ServicerContext, *, key: ApiKey, message: str, subject: str, retry_after_s: float | None
) -> None:
    """Raise RESOURCE_EXHAUSTED, with QuotaFailure (and RetryInfo) details in the status trailer."""
    log.info("request over its key's limit", extra={"key_name": key.name, "limit": subject})
    quota = any_pb2.Any()
    quota.Pack(
        error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=f"api_key:{key.name}:{subject}")]
        )
    )
    details = [quota]
    if retry_after_s is not None:
        retry = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(max(1, math.ceil(retry_after_s * 1000)))
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    status = rich_status(StatusCode.RESOURCE_EXHAUSTED, message, details)
    # The error-mapping interceptor aborts with the code and message; the details ride in the trailer.
    context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
    raise ResourceExhausted(message)
