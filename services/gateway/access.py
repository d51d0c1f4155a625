"""Who may call the API and how much: API keys, per-key rate and concurrency limits, undecodable requests.

Limits live in Redis, so they hold across gateway replicas: the rate is a GCRA bucket updated by one
Lua script against Redis's own clock, and each RPC in flight holds a lease that its gateway renews while
the RPC runs and releases when it ends, so a gateway that dies leaks no concurrency for longer than one
lease TTL. A caller without a valid key is refused before its request is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor, duration_pb2
from google.rpc import error_details_pb2
from redis.asyncio import Redis

from gkt import logs, metrics
from gkt.errors import InvalidArgument, ResourceExhausted, StatusCode, Unauthenticated
from gkt.queue import TAKE_SLOT, Keys
from gkt.v1 import guidance_pb2
from services.gateway import tenancy
from services.gateway.auth import ANONYMOUS, ApiKey, ApiKeys
from services.gateway.errors import rich_status
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
# Pushes a lease's expiry to now + ARGV[1] ms (re-adding it if it lapsed: its RPC is still running).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""
_FAILED_PEERS_KEPT = 10_000
"""Peers whose failed authentications are counted (the least recent are forgotten first)."""


@dataclass(frozen=True)
class Limits:
    """One key's effective limits; 0 means unlimited."""

    rate_per_s: float
    burst: int
    max_concurrent: int
    max_queued: int

    @classmethod
    def of(cls, key: ApiKey, settings: GatewaySettings) -> Limits:
        """The key's own limits where its line sets them, the gateway's defaults elsewhere."""
        rate = key.rate_per_s if key.rate_per_s is not None else settings.gateway_key_rate_per_s
        burst = key.burst if key.burst is not None else settings.gateway_key_burst
        concurrent = (
            key.max_concurrent if key.max_concurrent is not None else settings.gateway_key_max_concurrent
        )
        queued = key.max_queued if key.max_queued is not None else settings.gateway_key_max_queued
        return cls(
            rate_per_s=rate,
            burst=burst or max(1, math.ceil(rate)),
            max_concurrent=concurrent,
            max_queued=queued,
        )


class Limiter:
    """The Redis side of the limits, shared by every gateway replica."""

    def __init__(self, *, redis: Redis, keys: Keys) -> None:
        self.keys = keys
        self.redis = redis
        self._gcra = redis.register_script(_GCRA)
        self._lease = redis.register_script(TAKE_SLOT)
        self._renew = redis.register_script(_RENEW)

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

    async def renew(self, key_id: str, lease: str, *, ttl_s: float) -> None:
        """Keep a lease of a running RPC for another `ttl_s`."""
        await self._renew(keys=[self.keys.leases(key_id)], args=[max(1, math.ceil(ttl_s * 1000)), lease])

    async def release(self, key_id: str, lease: str) -> None:
        try:
            await self.redis.zrem(self.keys.leases(key_id), lease)
        except Exception:  # Redis gone: the lease expires one TTL after its last renewal instead
            log.warning("could not release a concurrency lease", extra={"key_name": key_id})

    @contextlib.asynccontextmanager
    async def holding(self, key_id: str, lease: str | None, *, ttl_s: float) -> AsyncIterator[None]:
        """Renew `lease` every third of its TTL while the block runs; release it when the block ends."""
        if lease is None:
            yield
            return
        renewing = asyncio.create_task(self._keep(key_id, lease, ttl_s=ttl_s))
        try:
            yield
        finally:
            renewing.cancel()
            await asyncio.shield(self.release(key_id, lease))

    async def _keep(self, key_id: str, lease: str, *, ttl_s: float) -> None:
        while True:
            await asyncio.sleep(ttl_s / 3)
            try:
                await self.renew(key_id, lease, ttl_s=ttl_s)
            except Exception:  # Redis gone for now: the next renewal re-adds the lease
                log.warning("could not renew a concurrency lease", extra={"key_name": key_id})


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
            parse=_tolerant(handler.request_deserializer, request_type),
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
