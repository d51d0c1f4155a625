"""Who may call the API and how much: API keys, per-key rate and concurrency limits, undecodable requests.

Limits live in Redis, so they hold across gateway replicas: the rate is a GCRA bucket updated by one
Lua script against Redis's own clock, and each RPC in flight holds a lease that expires at the RPC's
deadline, so a gateway that dies leaks no concurrency.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from redis.asyncio import Redis

from gkt import logs, metrics
from gkt.errors import InvalidArgument, ResourceExhausted
from gkt.queue import Keys
from gkt.v1 import guidance_pb2
from services.gateway.auth import ANONYMOUS, ApiKey, ApiKeys
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

_SERVICE = guidance_pb2.DESCRIPTOR.services_by_name["GuidanceService"]
_PREFIX = f"/{_SERVICE.full_name}/"

# Returns 0 when the request may go, else the milliseconds until it could.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if allow_at > now then return math.ceil(allow_at - now) end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
return 0
"""
# Returns 1 when the lease was taken, 0 when the key has `limit` leases that have not expired.
_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""


@dataclass(frozen=True)
class Limits:
    """One key's effective limits; 0 means unlimited."""

    rate_per_s: float
    burst: int
    max_concurrent: int

    @classmethod
    def of(cls, key: ApiKey, settings: GatewaySettings) -> Limits:
        """The key's own limits where its line sets them, the gateway's defaults elsewhere."""
        rate = key.rate_per_s if key.rate_per_s is not None else settings.gateway_key_rate_per_s
        burst = key.burst if key.burst is not None else settings.gateway_key_burst
        concurrent = (
            key.max_concurrent if key.max_concurrent is not None else settings.gateway_key_max_concurrent
        )
        return cls(rate_per_s=rate, burst=burst or max(1, math.ceil(rate)), max_concurrent=concurrent)


class Limiter:
    """The Redis side of the limits, shared by every gateway replica."""

    def __init__(self, *, redis: Redis, keys: Keys) -> None:
        self.keys = keys
        self.redis = redis
        self._gcra = redis.register_script(_GCRA)
        self._lease = redis.register_script(_LEASE)

    async def take(self, key_id: str, *, rate_per_s: float, burst: int) -> float:
        """Spend one request of the key's rate: 0 if allowed, else the seconds until one would be."""
        wait_ms = await self._gcra(keys=[self.keys.rate(key_id)], args=[1000.0 / rate_per_s, burst])
        return int(wait_ms) / 1000

    async def acquire(self, key_id: str, *, limit: int, ttl_s: float) -> str | None:
        """A lease id if the key has fewer than `limit` RPCs in flight; it expires after `ttl_s`."""
        lease = uuid.uuid4().hex
        ttl_ms = max(1, math.ceil(ttl_s * 1000))
        taken = await self._lease(keys=[self.keys.leases(key_id)], args=[limit, ttl_ms, lease])
        return lease if int(taken) else None

    async def release(self, key_id: str, lease: str) -> None:
        try:
            await self.redis.zrem(self.keys.leases(key_id), lease)
        except Exception:  # Redis gone: the lease expires at the RPC's deadline instead
            log.warning("could not release a concurrency lease", extra={"key_name": key_id})


@dataclass(frozen=True)
class Undecodable:
    """A request the protobuf parser refused (e.g. a string field that is not UTF-8); `field` names it."""

    field: str


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates the caller, enforces its key's limits, and refuses undecodable requests.

    Install it after the error-mapping interceptor: what it raises is then mapped and counted there.
    """

    def __init__(self, *, settings: GatewaySettings, api_keys: ApiKeys | None, limiter: Limiter) -> None:
        self.settings = settings
        self.api_keys = api_keys
        self.limiter = limiter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(_PREFIX):
            return handler
        request_type = _SERVICE.methods_by_name[method.removeprefix(_PREFIX)].input_type
        deserializer = _tolerant(handler.request_deserializer, request_type)
        metadata = handler_call_details.invocation_metadata
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, metadata),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, metadata),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary(
        self, behaviour: Callable[..., Awaitable[Any]], metadata: Any
    ) -> Callable[..., Awaitable[Any]]:
        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            key, lease = await self._admit(request, context, metadata)
            try:
                return await behaviour(request, context)
            finally:
                if lease:
                    await asyncio.shield(self.limiter.release(key.key_id, lease))

        return admitted

    def _stream(
        self, behaviour: Callable[..., AsyncIterator[Any]], metadata: Any
    ) -> Callable[..., AsyncIterator[Any]]:
        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            key, lease = await self._admit(request, context, metadata)
            try:
                async for reply in behaviour(request, context):
                    yield reply
            finally:
                if lease:
                    await asyncio.shield(self.limiter.release(key.key_id, lease))

        return admitted

    async def _admit(
        self, request: Any, context: grpc.aio.ServicerContext, metadata: Any
    ) -> tuple[ApiKey, str | None]:
        """1) who is calling, 2) is the request readable, 3) within the key's rate, 4) and concurrency."""
        key = ANONYMOUS
        if self.api_keys is not None:
            try:
                key = self.api_keys.check(metadata)
            except Exception:
                metrics.GATEWAY_REJECTED.labels("unauthenticated").inc()
                raise
            logs.bind(key_name=key.name)
        if isinstance(request, Undecodable):
            raise InvalidArgument(request.field, "could not be decoded (strings must be UTF-8)")
        limits = Limits.of(key, self.settings)
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
            return key, None
        remaining = context.time_remaining()
        ttl_s = remaining if remaining is not None else self.settings.gateway_default_timeout_s
        lease = await self.limiter.acquire(key.key_id, limit=limits.max_concurrent, ttl_s=ttl_s)
        if lease is None:
            metrics.GATEWAY_REJECTED.labels("concurrency_limited").inc()
            _refuse(
                context,
                key=key,
                message=f"API key {key.name!r} already has {limits.max_concurrent} requests in flight",
                subject="concurrency",
                retry_after_s=None,
            )
        return key, lease


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
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=details)
    # The error-mapping interceptor aborts with the code and message; the details ride in the trailer.
    context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
    raise ResourceExhausted(message)


def _tolerant(deserialize: Callable[[bytes], Any], message: descriptor.Descriptor) -> Callable[[bytes], Any]:
    """A deserializer that turns a parse failure into `Undecodable` instead of grpc's INTERNAL."""

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:
            return Undecodable(field=_bad_field(message, data) or message.name)

    return parse


def _bad_field(message: descriptor.Descriptor, data: bytes, prefix: str = "") -> str:
    """The dotted name of the first field whose bytes do not parse (walks the wire format)."""
    position, name = 0, prefix.rstrip(".")
    try:
        while position < len(data):
            tag, position = _varint(data, position)
            field = message.fields_by_number.get(tag >> 3)
            name = prefix + field.name if field is not None else prefix.rstrip(".")
            wire_type = tag & 7
            if wire_type == 0:
                _, position = _varint(data, position)
            elif wire_type in (1, 5):
                position += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                length, position = _varint(data, position)
                chunk, position = data[position : position + length], position + length
                if len(chunk) < length:
                    return name
                if field is not None and field.type == descriptor.FieldDescriptor.TYPE_STRING:
                    chunk.decode("utf-8")
                elif field is not None and field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
                    inner = _bad_field(field.message_type, chunk, f"{name}.")
                    if inner:
                        return inner
            else:
                return name
    except (IndexError, UnicodeDecodeError):
        return name
    return ""


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")
