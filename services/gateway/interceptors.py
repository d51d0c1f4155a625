"""One place where errors become gRPC statuses, and where RPCs are counted and timed."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gkt import metrics
from gkt.errors import GktError, InvalidArgument, Unauthenticated
from services.gateway.auth import ApiKeys

log = logging.getLogger(__name__)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Checks API keys (when configured), maps GktError to its status (with BadRequest details),
    Redis outages to UNAVAILABLE, anything else to INTERNAL without a trace; records request metrics."""

    def __init__(self, *, api_keys: ApiKeys | None = None) -> None:
        self.api_keys = api_keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith("/gkt.v1."):
            return handler
        rpc = handler_call_details.method.rsplit("/", 1)[-1]
        if self.api_keys is not None:
            try:
                self.api_keys.check(handler_call_details.invocation_metadata)
            except Unauthenticated as exc:
                metrics.GATEWAY_REJECTED.labels("unauthenticated").inc()
                return _refuse(exc, unary=bool(handler.unary_unary))
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(rpc, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(rpc, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _refuse(exc: Unauthenticated, *, unary: bool) -> grpc.RpcMethodHandler:
    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)

    async def abort_stream(_request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
        yield  # pragma: no cover  (makes this an async generator)

    if unary:
        return grpc.unary_unary_rpc_method_handler(abort)
    return grpc.unary_stream_rpc_method_handler(abort_stream)


def _wrap_unary(rpc: str, behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        metrics.GATEWAY_IN_FLIGHT.labels(rpc).inc()
        code = grpc.StatusCode.OK
        try:
            return await behaviour(request, context)
        except Exception as exc:
            code, message = _status_of(exc)
            await _abort(exc, code, message, context)
        finally:
            _record(rpc, code, started)

    return wrapper


def _wrap_stream(rpc: str, behaviour: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        metrics.GATEWAY_IN_FLIGHT.labels(rpc).inc()
        code = grpc.StatusCode.OK
        try:
            async for reply in behaviour(request, context):
                yield reply
        except Exception as exc:
            code, message = _status_of(exc)
            await _abort(exc, code, message, context)
        finally:
            _record(rpc, code, started)

    return wrapper


def _record(rpc: str, code: grpc.StatusCode, started: float) -> None:
    metrics.GATEWAY_IN_FLIGHT.labels(rpc).dec()
    metrics.GATEWAY_REQUESTS.labels(rpc, code.name).inc()
    metrics.GATEWAY_LATENCY.labels(rpc).observe(time.perf_counter() - started)


async def _abort(
    exc: Exception, code: grpc.StatusCode, message: str, context: grpc.aio.ServicerContext
) -> None:
    """End the RPC with `code` (always raises)."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, InvalidArgument):
        await context.abort_with_status(rpc_status.to_status(_bad_request(exc)))
    await context.abort(code, message)


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, grpc.aio.AbortError):  # the servicer aborted itself: its status stands
        return grpc.StatusCode.ABORTED, ""
    if isinstance(exc, GktError):
        return grpc.StatusCode.__members__.get(exc.code, grpc.StatusCode.INTERNAL), exc.message
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | ConnectionError):
        log.warning("redis unavailable: %s", exc)
        return grpc.StatusCode.UNAVAILABLE, "the job store is unavailable; retry shortly"
    log.exception("unexpected error")
    return grpc.StatusCode.INTERNAL, "internal error"


def _bad_request(exc: InvalidArgument) -> status_pb2.Status:
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.description)
            ]
        )
    )
    return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=exc.message, details=[detail])
