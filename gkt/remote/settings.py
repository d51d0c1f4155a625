"""How a worker reaches a remote inference server; the teacher and the students each read it under their
own prefix (`GKT_TEACHER_…`, `GKT_STUDENT_…`)."""

from __future__ import annotations

from typing import Self

from pydantic import Field, FilePath, HttpUrl, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RemoteServerSettings(BaseSettings):
    """URL, credentials, timeouts, retries and circuit breaker of one remote inference server."""

    # An empty variable (e.g. an unset secret rendered as "") means "not set", not an invalid value.
    model_config = SettingsConfigDict(extra="ignore", env_ignore_empty=True)

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
                prefix = self.model_config.get("env_prefix", "")
                raise ValueError(f"{prefix}API_KEY_FILE {self.api_key_file} is empty")
            return SecretStr(key)
        return self.api_key
