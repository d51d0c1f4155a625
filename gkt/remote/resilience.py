"""Resilience for remote servers: per-request timeout, jittered retries and a circuit breaker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from gkt.errors import StatusCode
from gkt.remote.breaker import CircuitBreaker
from gkt.remote.errors import AttemptError, BackendError
from gkt.remote.settings import RemoteServerSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def _query_field(_message: str) -> str:
    # The gateway validated every other field, so a request the server refuses as invalid is one whose
    # prompt does not fit its context (TGI: 422 "inputs tokens + max_new_tokens must be <= ...").
    return "query"


class ResilientCaller:
    """Runs HTTP attempts under the timeout, retry and breaker policy.

    Retried: connection errors, 429, 503, other 5xx and TGI's 424. Not retried: timeouts (a slow server
    only gets slower when asked twice; the breaker counts them), 4xx validation errors, malformed replies.
    Backoff is "equal jitter": half of `min(max, base * 2**n)` fixed, half random, at least any Retry-After
    (capped at `backoff_max_s`), so requests rejected together do not come back together.
    A timeout ends as UNAVAILABLE (kind `timeout`), not DEADLINE_EXCEEDED: the client's own deadline has
    not passed, the worker's server was slow, and UNAVAILABLE is the status gRPC clients may retry.
    """

    def __init__(
        self, *, settings: RemoteServerSettings, name: str, invalid_field: Callable[[str], str] = _query_field
    ) -> None:
        self._settings = settings
        self._name = name
        """How messages and logs name the server's client, e.g. "teacher backend tgi"."""
        self._invalid_field = invalid_field
        self._rng = random.Random()
        self.breaker = CircuitBreaker(
            failure_threshold=settings.breaker_failures, reset_after_s=settings.breaker_reset_s, name=name
        )

    @property
    def request_timeout_s(self) -> float:
        return self._settings.request_timeout_s

    async def call(self, attempt: Callable[[], Awaitable[T]], *, limit: asyncio.Semaphore | None = None) -> T:
        """Return the first successful attempt's value, or raise the request's `BackendError`. Each
        attempt runs under the request timeout and, when given, holds a place of `limit` while it runs."""
        last: AttemptError | None = None
        for number in range(self._settings.max_retries + 1):
            # Fail fast without queueing behind the concurrency limit when the server is known dead.
            if not self.breaker.allows():
                raise self.fail(self._circuit_open(last))
            async with _held(limit):
                if not self.breaker.acquire():
                    raise self.fail(self._circuit_open(last))
                try:
                    async with asyncio.timeout(self._settings.request_timeout_s):
                        value = await attempt()
                except TimeoutError:
                    error = AttemptError(
                        f"no response within {self._settings.request_timeout_s:g} s",
                        kind="timeout",
                        code=StatusCode.UNAVAILABLE,
                        server_fault=True,
                    )
                except AttemptError as exc:
                    error = exc
                except BaseException:
                    self.breaker.abandon()
                    raise
                else:
                    self.breaker.record_success()
                    return value
            self.record(error)
            last = error
            if not error.retryable or number == self._settings.max_retries:
                break
            delay = self._backoff_s(number=number, retry_after_s=error.retry_after_s)
            log.info(
                "%s: attempt failed; retrying",
                self._name,
                extra={
                    "backend": self._name,
                    "kind": error.kind,
                    "attempt": number + 1,
                    "delay_s": round(delay, 3),
                },
            )
            await asyncio.sleep(delay)
        assert last is not None
        attempts = f" after {number + 1} attempts" if number else ""
        raise self.fail(self.final(last, note=attempts))

    async def call_one(
        self, attempt: Callable[[R], Awaitable[T]], request: R, *, limit: asyncio.Semaphore | None = None
    ) -> T | BackendError:
        """`call` for one request, its failure (a bug included) returned as a `BackendError`."""
        try:
            return await self.call(lambda: attempt(request), limit=limit)
        except BackendError as exc:
            return exc
        except Exception as exc:
            log.exception("%s: unexpected error", self._name)
            return self.fail(
                BackendError(f"{self._name}: {exc!r}", code=StatusCode.INTERNAL, kind="internal")
            )

    async def call_each(
        self, attempt: Callable[[R], Awaitable[T]], requests: Sequence[R], *, limit: asyncio.Semaphore
    ) -> list[T | BackendError]:
        """`call_one` for every request concurrently; each fails alone, in its own slot, so a failed
        request (or a bug) never touches its batch-mates."""
        return list(await asyncio.gather(*(self.call_one(attempt, r, limit=limit) for r in requests)))

    def record(self, error: AttemptError) -> None:
        """Tell the breaker how an attempt failed: a server fault counts, anything else proves it alive."""
        if error.server_fault:
            self.breaker.record_failure()
        else:
            self.breaker.record_success()

    def final(self, error: AttemptError, *, note: str = "") -> BackendError:
        """The request's failure as its job sees it."""
        field = self._invalid_field(error.message) if error.code == StatusCode.INVALID_ARGUMENT else ""
        return BackendError(
            f"{self._name}: {error.message}{note}", code=error.code, kind=error.kind, field=field
        )

    def fail(self, error: BackendError) -> BackendError:
        """Log a request's final failure; returns it for `raise` or a batch slot (the worker counts it)."""
        # While the circuit is open every job fails the same way; the breaker logged that once.
        level = logging.DEBUG if error.kind == "circuit_open" else logging.WARNING
        log.log(
            level,
            "%s: request failed",
            self._name,
            extra={"backend": self._name, "kind": error.kind, "code": error.code, "error": error.message},
        )
        return error

    def _circuit_open(self, last: AttemptError | None) -> BackendError:
        cause = f"; last error: {last.message}" if last is not None else ""
        return BackendError(
            f"{self._name} is unavailable: circuit open after "
            f"{self.breaker.consecutive_failures} consecutive failures, next probe in "
            f"{self.breaker.retry_in_s():.1f} s{cause}",
            code=StatusCode.UNAVAILABLE,
            kind="circuit_open",
        )

    def _backoff_s(self, *, number: int, retry_after_s: float | None) -> float:
        cap = min(self._settings.backoff_max_s, self._settings.backoff_base_s * 2**number)
        delay = cap / 2 + self._rng.uniform(0, cap / 2)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self._settings.backoff_max_s))
        return delay


@contextlib.asynccontextmanager
async def _held(limit: asyncio.Semaphore | None) -> AsyncIterator[None]:
    if limit is None:
        yield
        return
    async with limit:
        yield
