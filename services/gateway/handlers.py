"""What every gateway interceptor does to a call's handler: wrap the behaviour of a `gkt.v1` method."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

Behaviour = Callable[..., Any]
"""A method's behaviour: `(request, context)` → a reply (unary) or replies (an async generator, or a
coroutine that writes them with `context.write`)."""


def wrapped(
    handler: grpc.RpcMethodHandler | None,
    method: str,
    *,
    unary: Callable[[Behaviour], Behaviour],
    stream: Callable[[Behaviour], Behaviour],
) -> grpc.RpcMethodHandler | None:
    """`handler` with its unary behaviour passed through `unary`, or its server-streaming behaviour through
    `stream`; a handler outside `gkt.v1` (health, reflection) or of another kind is returned as it is."""
    if handler is None or not method.startswith("/gkt.v1."):
        return handler
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream(handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler
