"""Resilience for remote teacher backends: each request under a timeout, jittered retries and the circuit
breaker (`services.teacher.backends.breaker`), each failure judged by `services.teacher.backends.remote`."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from gkt.errors import StatusCode
from services.teacher.backends.base import BackendError
from services.teacher.backends.breaker import CircuitBreaker
from services.teacher.backends.remote import AttemptError, RemoteBackendSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class ResilientCaller:
    """Runs HTTP attempts under the timeout, retry and breaker policy, and counts what failed.

    Retried: connection errors, 429, 503, other 5xx and TGI's 424. Not retried: timeouts (a slow server
    only gets slower when asked twice; the breaker counts them), 4xx validation errors, malformed replies.
    Backoff is "equal jitter": half of `min(max, base * 2**n)` fixed, half random, at least any Retry-After
    (capped at `backoff_max_s`), so batch-mates rejected together do not come back together.
    A timeout ends as UNAVAILABLE (kind `timeout`), not DEADLINE_EXCEEDED: the client's own deadline has
    not passed, the teacher's server was slow, and UNAVAILABLE is the status gRPC clients may retry.
    """

    def __init__(self, *, settings: RemoteBackendSettings, backend_name: str) -> None:
        self._settings = settings
        self._name = backend_name
        self._rng = random.Random()
        self.breaker = CircuitBreaker(
            failure_threshold=settings.breaker_failures,
            reset_after_s=settings.breaker_reset_s,
            name=backend_name,
        )

    async def call(self, attempt: Callable[[], Awaitable[T]], *, limit: asyncio.Semaphore) -> T:
        """Return the first successful attempt's value, or raise the request's `BackendError`."""
        last: AttemptError | None = None
        for number in range(self._settings.max_retries + 1):
            # Fail fast without queueing behind the concurrency limit when the server is known dead.
            if not self.breaker.allows():
                raise self.fail(self._circuit_open(last))
            async with limit:
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
            if error.server_fault:
                self.breaker.record_failure()
            else:
                self.breaker.record_success()
            last = error
            if not error.retryable or number == self._settings.max_retries:
                break
            delay = self._backoff_s(number=number, retry_after_s=error.retry_after_s)
            log.info(
                "teacher backend attempt failed; retrying",
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
        # The gateway validated every other field, so a request the server refuses as invalid is one whose
        # prompt does not fit its context (TGI: 422 "inputs tokens + max_new_tokens must be <= ...").
        field = "query" if last.code == StatusCode.INVALID_ARGUMENT else ""
        raise self.fail(
            BackendError(
                f"teacher backend {self._name}: {last.message}{attempts}",
                code=last.code,
                kind=last.kind,
                field=field,
            )
        )

    async def call_each(
        self, attempt: Callable[[R], Awaitable[T]], requests: Sequence[R], *, limit: asyncio.Semaphore
    ) -> list[T | BackendError]:
        """`call` for every request concurrently; each fails alone, as a `BackendError` in its slot, so a
        failed request (or a bug) never touches its batch-mates."""

        async def one(request: R) -> T | BackendError:
            try:
                return await self.call(lambda: attempt(request), limit=limit)
            except BackendError as exc:
                return exc
            except Exception as exc:
                log.exception("teacher backend %s: unexpected error", self._name)
                return self.fail(
                    BackendError(
                        f"teacher backend {self._name}: {exc!r}", code=StatusCode.INTERNAL, kind="internal"
                    )
                )

        return list(await asyncio.gather(*(one(r) for r in requests)))

    def fail(self, error: BackendError) -> BackendError:
        """Log a request's final failure; returns it for `raise` or a batch slot (the worker counts it)."""
        # While the circuit is open every job fails the same way; the breaker logged that once.
        level = logging.DEBUG if error.kind == "circuit_open" else logging.WARNING
        log.log(
            level,
            "teacher backend request failed",
            extra={"backend": self._name, "kind": error.kind, "code": error.code, "error": error.message},
        )
        return error

    def _circuit_open(self, last: AttemptError | None) -> BackendError:
        cause = f"; last error: {last.message}" if last is not None else ""
        return BackendError(
            f"teacher backend {self._name} is unavailable: circuit open after "
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
