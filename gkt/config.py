"""Settings shared by every service: Redis, key layout, logging. Services subclass `CommonSettings`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

_URL_PASSWORD = re.compile(r"(?<=://)([^:@/]*):([^@/]+)@")


class CommonSettings(BaseSettings):
    """Read from `GKT_*` environment variables; each service adds its own fields."""

    model_config = SettingsConfigDict(env_prefix="GKT_", extra="ignore", frozen=True)

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis for the query stream, job events and the Celery broker (rediss:// for TLS).",
        min_length=8,
    )
    key_prefix: str = Field(default="gkt", description="Prefix of every Redis key.", pattern=r"^[\w.-]+$")
    job_ttl_s: int = Field(default=3600, ge=10, le=7 * 86400, description="Lifetime of a job's keys.")
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="Log level.")
    model_cache_dir: Path = Field(
        default=Path.home() / ".cache" / "gkt" / "models",
        description="Where converted bundled models are cached (first load converts GGUF, later loads read this).",
    )

    def describe(self) -> str:
        """One JSON line of every setting, with secrets and URL passwords masked."""
        shown: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                value = "**********" if value.get_secret_value() else ""
            elif isinstance(value, str):
                value = _URL_PASSWORD.sub(r"\1:****@", value)
            elif isinstance(value, Path):
                value = str(value)
            shown[name] = value
        return json.dumps(shown, sort_keys=True, default=str)
