"""Errors that reach a client: each carries the gRPC status it maps to (by name)."""

from __future__ import annotations


class GktError(Exception):
    """Base of every error a client may see; `code` is a `grpc.StatusCode` name."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(GktError):
    """A request field is wrong; `field` names it (dotted path, as in the proto)."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class ResourceExhausted(GktError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(GktError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(GktError):
    code = "UNAVAILABLE"


class Cancelled(GktError):
    code = "CANCELLED"


class Unauthenticated(GktError):
    code = "UNAUTHENTICATED"


class JobFailed(GktError):
    """A job ended with an error event; it carries the status the worker chose."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
