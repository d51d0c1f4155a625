"""The one place errors become gRPC statuses: the table from `StatusCode` to `grpc.StatusCode`, and the
interceptor that ends every API call that raised with its status (BadRequest details for a bad field, Redis
outages as UNAVAILABLE, anything else INTERNAL without a trace)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gkt.errors import GktError, InvalidArgument, StatusCode
from services.gateway.handlers import wrapped

log = logging.getLogger(__name__)

GRPC_STATUS: dict[StatusCode, grpc.StatusCode] = {
    StatusCode.CANCELLED: grpc.StatusCode.CANCELLED,
    StatusCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    StatusCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    StatusCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StatusCode.INTERNAL: grpc.StatusCode.INTERNAL,
    StatusCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    StatusCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
}


def rich_status(code: StatusCode, message: str, details: Sequence[any_pb2.Any]) -> status_pb2.Status:
    """A `google.rpc.Status` (the status with its details, as the `grpc-status-details-bin` trailer holds
    it) for `code`."""
    return status_pb2.Status(code=GRPC_STATUS[code].value[0], message=message, details=list(details))


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps GktError to its status (with BadRequest details), Redis outages to UNAVAILABLE, anything
    else to INTERNAL without a trace."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        return wrapped(handler, handler_call_details.method, unary=_wrap_unary, stream=_wrap_stream)


def _wrap_unary(behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except Exception as exc:
            code, message = _status_of(exc)
            await _abort(exc, code, message, context)

    return wrapper


def _wrap_stream(
    behaviour: Callable[..., AsyncGenerator[Any, None]],
) -> Callable[..., AsyncGenerator[Any, None]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
        try:
            async with contextlib.aclosing(behaviour(request, context)) as replies:
                async for reply in replies:
                    yield reply
        except Exception as exc:
            code, message = _status_of(exc)
            await _abort(exc, code, message, context)

    return wrapper


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
        return GRPC_STATUS[exc.code], exc.message
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
    return rich_status(StatusCode.INVALID_ARGUMENT, exc.message, [detail])
