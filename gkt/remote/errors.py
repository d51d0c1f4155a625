"""How a remote server's failures are classified: the job's status, whether to retry, whether the
server is to blame (the circuit breaker counts only those). The one place that decides it."""

from __future__ import annotations

import email.utils
import time

import httpx2

from gkt.errors import GktError, StatusCode

_DETAIL_CHARS = 300


class BackendError(GktError):
    """Generation failed for one request; `code` says how the client should see it."""

    code = StatusCode.UNAVAILABLE

    def __init__(
        self,
        message: str,
        *,
        code: StatusCode = StatusCode.UNAVAILABLE,
        kind: str = "error",
        field: str = "",
    ) -> None:
        super().__init__(message)
        self.code = StatusCode(code)
        self.kind = kind
        """A bounded label for metrics: timeout, connection, overloaded, server, invalid, circuit_open…"""
        self.field = field
        """For `INVALID_ARGUMENT`: the request field at fault."""


class AttemptError(Exception):
    """One HTTP attempt failed: how a client sees it, whether to retry, and whether it blames the server."""

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        code: StatusCode,
        retryable: bool = False,
        server_fault: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.code = StatusCode(code)
        self.retryable = retryable
        self.server_fault = server_fault
        self.retry_after_s = retry_after_s


def classify_status(*, status: int, detail: str, retry_after_s: float | None = None) -> AttemptError:
    """Map an HTTP error status to an attempt error."""
    message = f"HTTP {status}: {detail}" if detail else f"HTTP {status}"
    if status == 429:
        return AttemptError(
            message,
            kind="overloaded",
            code=StatusCode.RESOURCE_EXHAUSTED,
            retryable=True,
            retry_after_s=retry_after_s,
        )
    if status == 503:
        # A 503 is an overloaded or absent upstream (TGI warming up, a proxy with no backend): it counts
        # against the breaker, unlike 429, which proves the server is alive and answering.
        return AttemptError(
            message,
            kind="overloaded",
            code=StatusCode.UNAVAILABLE,
            retryable=True,
            server_fault=True,
            retry_after_s=retry_after_s,
        )
    if status == 408:
        return AttemptError(message, kind="timeout", code=StatusCode.UNAVAILABLE, server_fault=True)
    if status in (400, 413, 422):
        return AttemptError(message, kind="invalid", code=StatusCode.INVALID_ARGUMENT)
    if status in (401, 403):
        # The worker's credentials are wrong: nothing the client can fix, nothing a retry can fix.
        return AttemptError(message, kind="auth", code=StatusCode.INTERNAL)
    if status == 424 or status >= 500:
        # TGI answers 424 when generation itself failed on the server (e.g. a CUDA error).
        return AttemptError(
            message, kind="server", code=StatusCode.UNAVAILABLE, retryable=True, server_fault=True
        )
    return AttemptError(message, kind="invalid", code=StatusCode.INTERNAL)


def transport_error(exc: httpx2.TransportError, *, url: str) -> AttemptError:
    """A request that got no (complete) HTTP answer: a timeout is not retried, a broken connection is."""
    if isinstance(exc, httpx2.TimeoutException):
        return AttemptError(
            f"timed out: {exc!r}", kind="timeout", code=StatusCode.UNAVAILABLE, server_fault=True
        )
    return AttemptError(
        f"cannot reach {url}: {exc!r}",
        kind="connection",
        code=StatusCode.UNAVAILABLE,
        retryable=True,
        server_fault=True,
    )


def malformed(message: str) -> AttemptError:
    """A reply that does not follow the server's published schema."""
    return AttemptError(short(message), kind="malformed", code=StatusCode.INTERNAL, server_fault=True)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def status_error(response: httpx2.Response) -> AttemptError:
    """The attempt error of an HTTP error reply (its body already read)."""
    return classify_status(
        status=response.status_code,
        detail=error_detail(response),
        retry_after_s=parse_retry_after(response.headers.get("retry-after")),
    )


def error_detail(response: httpx2.Response) -> str:
    """The error text: TGI `{"error": str}`, OpenAI `{"error": {"message": str}}`, vLLM `{"message"}`."""
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    if not isinstance(error, str) and isinstance(body, dict):
        error = body.get("message")
    return short(error) if isinstance(error, str) else response.reason_phrase


def short(text: str) -> str:
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + "…"
