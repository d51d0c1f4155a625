"""Every API call ends by its deadline (the client's, else the gateway's default), even one whose client
stopped reading a stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any

import grpc

from gkt.errors import StatusCode
from services.gateway.errors import GRPC_STATUS
from services.gateway.handlers import wrapped

DEADLINE_SLACK_S = 1.0
"""How long after its deadline a call is cut: the service's own deadline check normally ends it first."""


class DeadlineInterceptor(grpc.aio.ServerInterceptor):
    """Ends each `gkt.v1` call with DEADLINE_EXCEEDED at its deadline (the client's, else the default).

    The service checks the deadline between reads of a job's events, but a streaming call whose client
    stops reading waits in gRPC's flow control instead, where no check runs: so replies are written here
    (`context.write`), under a timer that cancels the call's task.
    """

    def __init__(self, *, default_timeout_s: float) -> None:
        self.default_timeout_s = default_timeout_s

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        return wrapped(handler, handler_call_details.method, unary=self._unary, stream=self._stream)

    def _unary(self, behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def ended_by_deadline(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._timer(context) as timer:
                try:
                    return await behaviour(request, context)
                except asyncio.CancelledError:
                    await timer.abort_if_expired(context)
                    raise

        return ended_by_deadline

    def _stream(self, behaviour: Callable[..., AsyncGenerator[Any, None]]) -> Callable[..., Awaitable[None]]:
        async def ended_by_deadline(request: Any, context: grpc.aio.ServicerContext) -> None:
            replies = behaviour(request, context)
            with self._timer(context) as timer:
                try:
                    async for reply in replies:
                        await context.write(reply)
                except asyncio.CancelledError:
                    # cut while gRPC waited for the client to read: the inner interceptors end now
                    await replies.aclose()
                    await timer.abort_if_expired(context)
                    raise

        return ended_by_deadline

    @contextlib.contextmanager
    def _timer(self, context: grpc.aio.ServicerContext) -> Iterator[_Timer]:
        remaining = context.time_remaining()
        timeout_s = remaining if remaining is not None else self.default_timeout_s
        timer = _Timer(context, timeout_s=timeout_s + DEADLINE_SLACK_S)
        try:
            yield timer
        finally:
            timer.close()


class _Timer:
    """Cancels the current task after `timeout_s`, first setting the call's code to DEADLINE_EXCEEDED (so
    the metrics of the interceptors inside record it)."""

    def __init__(self, context: grpc.aio.ServicerContext, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.expired = False
        task = asyncio.current_task()
        assert task is not None

        def expire() -> None:
            self.expired = True
            context.set_code(GRPC_STATUS[StatusCode.DEADLINE_EXCEEDED])
            task.cancel()

        self._handle = asyncio.get_running_loop().call_later(timeout_s, expire)

    def close(self) -> None:
        self._handle.cancel()

    async def abort_if_expired(self, context: grpc.aio.ServicerContext) -> None:
        """End the call with DEADLINE_EXCEEDED if the timer cut it (raises); return if something else did."""
        if not self.expired:
            return
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        await context.abort(
            GRPC_STATUS[StatusCode.DEADLINE_EXCEEDED],
            f"the call's deadline ({self.timeout_s - DEADLINE_SLACK_S:g} s) passed before it ended",
        )
