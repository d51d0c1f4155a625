"""Errors that reach a client, and the one vocabulary of status codes they and failed jobs carry."""

from __future__ import annotations

import enum


class StatusCode(enum.StrEnum):
    """How a call or a job fails, named as gRPC names its status: the gateway maps each member to its gRPC
    status (`services.gateway.errors`). The value is what job events carry in Redis, so it never changes."""

    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"


class GktError(Exception):
    """Base of every error a client may see; `code` is the status the client gets."""

    code: StatusCode = StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(GktError):
    """A request field is wrong; `field` names it (dotted path, as in the proto)."""

    code = StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class ResourceExhausted(GktError):
    code = StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(GktError):
    code = StatusCode.DEADLINE_EXCEEDED


class Unavailable(GktError):
    code = StatusCode.UNAVAILABLE


class Cancelled(GktError):
    code = StatusCode.CANCELLED


class Unauthenticated(GktError):
    code = StatusCode.UNAUTHENTICATED


class JobFailed(GktError):
    """A job ended with an error event; it carries the status the worker chose (an unknown one raises
    ValueError)."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = StatusCode(code)
