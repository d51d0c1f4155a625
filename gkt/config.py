"""Settings shared by every service: Redis, key layout, logging. Services subclass `CommonSettings`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gkt.connections import SENTINEL_SCHEME, sentinel_target

_URL_PASSWORD = re.compile(r"(?<=://)([^:@/]*):([^@/]+)@")
_REDIS_SCHEMES = ("redis", "rediss", "unix", SENTINEL_SCHEME)


class CommonSettings(BaseSettings):
    """Read from `GKT_*` environment variables; each service adds its own fields."""

    model_config = SettingsConfigDict(env_prefix="GKT_", extra="ignore", frozen=True)

    # Declared before redis_url: the URL's validator reads it.
    redis_password_file: Path | None = Field(
        default=None,
        description="File holding the Redis password (e.g. a mounted Kubernetes Secret); it replaces "
        "any password in the Redis URL.",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis for the query stream, job events and the Celery broker: redis:// or rediss:// "
        "(TLS; `?ssl_ca_certs=/ca.pem`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs` as query parameters), "
        "or the master of a Sentinel group: redis+sentinel://[:password@]host:26379,host:26379,…/MASTER/DB.",
        min_length=8,
    )
    key_prefix: str = Field(default="gkt", description="Prefix of every Redis key.", pattern=r"^[\w.-]+$")
    job_ttl_s: int = Field(default=3600, ge=10, le=7 * 86400, description="Lifetime of a job's keys.")
    metrics_addr: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address the Prometheus /metrics port listens on: loopback unless a scraper elsewhere "
        "needs it (Kubernetes pods set 0.0.0.0).",
    )
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="Log level.")
    max_guidance_tokens: int = Field(
        default=512,
        ge=1,
        le=2**32 - 1,
        description="Longest guidance a request may ask for (max_guidance_tokens): the gateway refuses longer "
        "ones, and a teacher whose model or server cannot produce this much refuses to start.",
    )
    model_cache_dir: Path = Field(
        default=Path.home() / ".cache" / "gkt" / "models",
        description="Where converted bundled models are cached (first load converts GGUF, later loads read this).",
    )

    @field_validator("redis_url")
    @classmethod
    def _known_scheme_and_password_file(cls, url: str, info: ValidationInfo) -> str:
        scheme = urlsplit(url).scheme
        if scheme not in _REDIS_SCHEMES:
            raise ValueError(f"scheme {scheme!r}: expected one of {', '.join(_REDIS_SCHEMES)}")
        sentinel_target(url)  # a malformed Sentinel URL is refused here, saying what is wrong
        password_file = info.data.get("redis_password_file")
        if password_file is None:
            return url
        return with_password(url, Path(password_file).read_text().strip())

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


def variable_name(settings_class: type[BaseSettings], name: str) -> str:
    """The environment variable a settings field is read from: its class's prefix and its name, or the alias
    of a variable another program names (PROMETHEUS_MULTIPROC_DIR)."""
    alias = settings_class.model_fields[name].validation_alias
    if isinstance(alias, str):
        return alias
    return f"{settings_class.model_config.get('env_prefix', '')}{name}".upper()


def with_password(url: str, password: str) -> str:
    """`url` with its password replaced by `password` (quoted, so any character is safe)."""
    parts = urlsplit(url)
    user = quote(parts.username or "", safe="")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))
