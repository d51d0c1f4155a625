"""The gateway's accounting interceptors: one counts, times and traces every API call, one caps the calls
in flight (and refuses new ones while the gateway drains).

py-grpc-prometheus does not support grpc.aio, hence a small interceptor of our own. Server order
(`services.gateway.server`): [DeadlineInterceptor(...), MetricsInterceptor(), ErrorMappingInterceptor(),
InFlightLimitInterceptor(...), AccessInterceptor(...)], so the metrics see the final status code, a call
cut at its deadline included.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any

import grpc

from gkt import logs, metrics, tracing
from gkt.errors import ResourceExhausted, Unavailable
from services.gateway.handlers import wrapped


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts (by RPC and status code), times and traces each `gkt.v1` call; tracks calls in flight.

    Health checks and reflection are left out. Each call's request_id goes on its log lines.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith("/gkt.v1."):
            return handler
        call = _Call(rpc=method.rsplit("/", 1)[-1], span=method.lstrip("/"), details=handler_call_details)
        return wrapped(handler, method, unary=call.unary, stream=call.stream)


class _Call:
    """Wraps one RPC method's behaviour with its metrics, its span and its log context."""

    def __init__(self, *, rpc: str, span: str, details: grpc.HandlerCallDetails) -> None:
        self.rpc = rpc
        self.span = span
        self.details = details

    def unary(self, behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            metrics.GATEWAY_IN_FLIGHT.labels(self.rpc).inc()
            code = grpc.StatusCode.OK
            try:
                with self._scope(request):
                    return await behaviour(request, context)
            except BaseException as exc:
                code = _final_code(context, exc)
                raise
            finally:
                _record(self.rpc, code, started)

        return wrapper

    def stream(
        self, behaviour: Callable[..., AsyncGenerator[Any, None]]
    ) -> Callable[..., AsyncGenerator[Any, None]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
            started = time.perf_counter()
            metrics.GATEWAY_IN_FLIGHT.labels(self.rpc).inc()
            code = grpc.StatusCode.OK
            try:
                with self._scope(request):
                    async with contextlib.aclosing(behaviour(request, context)) as replies:
                        async for reply in replies:
                            yield reply
            except BaseException as exc:
                code = _final_code(context, exc)
                raise
            finally:
                _record(self.rpc, code, started)

        return wrapper

    @contextlib.contextmanager
    def _scope(self, request: Any) -> Iterator[None]:
        with (
            logs.job_context(request_id=str(getattr(request, "request_id", ""))[:128]),
            tracing.rpc_span(self.span, metadata=self.details.invocation_metadata),
        ):
            yield


def _final_code(context: grpc.aio.ServicerContext, exc: BaseException) -> grpc.StatusCode:
    """The status an RPC that raised ends with: the one it aborted with; else, when gRPC cancelled its task,
    what the client saw: DEADLINE_EXCEEDED once the client's deadline has passed, CANCELLED before (the
    client cancelled or went away). Client outcomes are never counted as the server's UNKNOWN."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _record(rpc: str, code: grpc.StatusCode, started: float) -> None:
    metrics.GATEWAY_IN_FLIGHT.labels(rpc).dec()
    metrics.GATEWAY_REQUESTS.labels(rpc, code.name).inc()
    metrics.GATEWAY_LATENCY.labels(rpc).observe(time.perf_counter() - started)


class InFlightLimitInterceptor(grpc.aio.ServerInterceptor):
    """Counts the `gkt.v1` calls in flight in this process: refuses those beyond `max_in_flight` with
    RESOURCE_EXHAUSTED, and every new one with UNAVAILABLE once draining (shutdown), when `drained` tells
    when the last has ended.

    Install it inside the error-mapping interceptor, which maps the refusals.
    """

    def __init__(self, *, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def drain(self) -> None:
        """Refuse new calls from now on (the ones in flight go on)."""
        self.draining = True

    async def drained(self) -> None:
        """Return once no call is in flight."""
        await self._idle.wait()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        return wrapped(handler, handler_call_details.method, unary=self._unary, stream=self._stream)

    def _unary(self, behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._slot():
                return await behaviour(request, context)

        return limited

    def _stream(
        self, behaviour: Callable[..., AsyncGenerator[Any, None]]
    ) -> Callable[..., AsyncGenerator[Any, None]]:
        async def limited(request: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
            with self._slot():
                async with contextlib.aclosing(behaviour(request, context)) as replies:
                    async for reply in replies:
                        yield reply

        return limited

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        if self.draining:
            metrics.GATEWAY_REJECTED.labels("draining").inc()
            raise Unavailable("this gateway is shutting down; retry, and another replica will answer")
        if self.in_flight >= self.max_in_flight:
            metrics.GATEWAY_REJECTED.labels("in_flight").inc()
            raise ResourceExhausted(
                f"this gateway serves {self.max_in_flight} calls at once already; retry shortly"
            )
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
