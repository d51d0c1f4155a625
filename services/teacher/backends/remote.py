"""A remote teacher server: how to reach it (`RemoteBackendSettings`, built once when the worker starts) and
how one HTTP attempt's failure is judged: the status a client sees, whether to retry, whether it blames the
server."""

from __future__ import annotations

import email.utils
import time
from typing import Self

from pydantic import Field, FilePath, HttpUrl, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gkt.errors import StatusCode


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
