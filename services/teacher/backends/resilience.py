"""Resilience for remote teacher backends: per-request timeout, jittered retries and a circuit breaker."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, Self, TypeVar

from pydantic import Field, FilePath, HttpUrl, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gkt.errors import StatusCode
from services.teacher.backends.base import BackendError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
BreakerState = Literal["closed", "open", "half_open"]


class RemoteBackendSettings(BaseSettings):
    """How the teacher reaches a remote inference server (`tgi` or `openai` backend); which model it asks
    for is `TeacherSettings.teacher_model`."""

    # An empty variable (e.g. an unset secret rendered as "") means "not set", not an invalid value.
    model_config = SettingsConfigDict(env_prefix="GKT_TEACHER_", extra="ignore", env_ignore_empty=True)

    url: HttpUrl = Field(
        default=HttpUrl("http://127.0.0.1:8080"),
        description="Server base URL (TGI: its root; OpenAI-compatible: its root or the `/v1` URL).",
    )
    api_key: SecretStr | None = Field(
        default=None, min_length=1, description="Bearer token for the server; never logged."
    )
    api_key_file: FilePath | None = Field(
        default=None, description="File holding the bearer token (a mounted secret); wins over `api_key`."
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Deadline of one HTTP attempt, from send to full response."
    )
    max_retries: int = Field(
        default=3, ge=0, le=10, description="Extra attempts after connection errors, 5xx and 429."
    )
    backoff_base_s: float = Field(default=0.1, ge=0, le=60, description="Backoff before the first retry.")
    backoff_max_s: float = Field(
        default=2.0, ge=0, le=300, description="Backoff ceiling (also caps Retry-After)."
    )
    max_concurrency: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="Requests in flight; 0 = TGI's /info limit (tgi) or 32 (openai).",
    )
    breaker_failures: int = Field(
        default=5, ge=1, le=10_000, description="Consecutive server failures that open the circuit breaker."
    )
    breaker_reset_s: float = Field(
        default=10.0, gt=0, le=3600, description="How long the breaker stays open before one probe request."
    )

    @model_validator(mode="after")
    def _backoff_ordered(self) -> Self:
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_base_s ({self.backoff_base_s})"
            )
        return self

    def read_api_key(self) -> SecretStr | None:
        """The bearer token: the file's content when a file is set, else `api_key`, else None."""
        if self.api_key_file is not None:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
            if not key:
                raise ValueError(f"GKT_TEACHER_API_KEY_FILE {self.api_key_file} is empty")
            return SecretStr(key)
        return self.api_key


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
    """Map an HTTP error status to an attempt error (the one place that decides retry and blame)."""
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
        # The teacher's credentials are wrong: nothing the client can fix, nothing a retry can fix.
        return AttemptError(message, kind="auth", code=StatusCode.INTERNAL)
    if status == 424 or status >= 500:
        # TGI answers 424 when generation itself failed on the server (e.g. a CUDA error).
        return AttemptError(
            message, kind="server", code=StatusCode.UNAVAILABLE, retryable=True, server_fault=True
        )
    return AttemptError(message, kind="invalid", code=StatusCode.INTERNAL)


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


class CircuitBreaker:
    """Opens after N consecutive server failures, then lets one probe through every `reset_after_s`."""

    def __init__(
        self,
        *,
        failure_threshold: int,
        reset_after_s: float,
        name: str = "remote",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._name = name
        self._threshold = failure_threshold
        self._reset_after_s = reset_after_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        return "open" if self._clock() - self._opened_at < self._reset_after_s else "half_open"

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_in_s(self) -> float:
        """Time until the next probe is allowed (0 when closed or half-open)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._reset_after_s - (self._clock() - self._opened_at))

    def allows(self) -> bool:
        """Whether a request could be sent now (no side effect: use before queueing)."""
        state = self.state
        return state == "closed" or (state == "half_open" and not self._probe_in_flight)

    def acquire(self) -> bool:
        """Claim the right to send one request now; in half-open state only one probe at a time gets it."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        """The server answered (even with a client error): close the breaker."""
        if self._opened_at is not None:
            log.info("teacher backend circuit closed", extra={"backend": self._name})
        self._failures = 0
        self._opened_at = None
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._probe_in_flight or (self._opened_at is None and self._failures >= self._threshold):
            if self._opened_at is None:
                log.warning(
                    "teacher backend circuit opened: failing its jobs fast",
                    extra={"backend": self._name, "failures": self._failures, "reset_s": self._reset_after_s},
                )
            self._opened_at = self._clock()
        self._probe_in_flight = False

    def abandon(self) -> None:
        """An attempt ended without a verdict (cancelled): free the probe slot, change nothing else."""
        self._probe_in_flight = False


class ResilientCaller:
    """Runs HTTP attempts under the timeout, retry and breaker policy, and counts what failed.

    Retried: connection errors, 429, 503, other 5xx and TGI's 424. Not retried: timeouts (a slow server
    only gets slower when asked twice; the breaker counts them), 4xx validation errors, malformed replies.
    Backoff is "equal jitter": half of `min(max, base * 2**n)` fixed, half random, at least any Retry-After
    (capped at `backoff_max_s`), so batch-mates rejected together do not come back together.
    A timeout ends as UNAVAILABLE (kind `timeout`), not DEADLINE_EXCEEDED: the client's own deadline has
    not passed, the teacher's server was slow, and UNAVAILABLE is the status gRPC clients may retry.
    """

    def __init__(
        self,
        *,
        settings: RemoteBackendSettings,
        backend_name: str,
        on_error: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._name = backend_name
        self._rng = rng or random.Random()
        self.on_error = on_error
        """Called with the `kind` of every request that finally failed (for the worker's metrics)."""
        self.breaker = CircuitBreaker(
            failure_threshold=settings.breaker_failures,
            reset_after_s=settings.breaker_reset_s,
            name=backend_name,
        )
        self.failures: Counter[str] = Counter()
        """Requests that finally failed, by kind."""
        self.retries: Counter[str] = Counter()
        """Attempts that failed and were retried, by kind."""

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
            self.retries[error.kind] += 1
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
        """Count and report a request's final failure; returns it for `raise` or a batch slot."""
        self.failures[error.kind] += 1
        # While the circuit is open every job fails the same way; the breaker logged that once.
        level = logging.DEBUG if error.kind == "circuit_open" else logging.WARNING
        log.log(
            level,
            "teacher backend request failed",
            extra={"backend": self._name, "kind": error.kind, "code": error.code, "error": error.message},
        )
        if self.on_error is not None:
            self.on_error(error.kind)
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
