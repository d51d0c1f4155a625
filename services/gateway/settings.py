"""The gateway's settings (`GKT_GATEWAY_*` and the common `GKT_*`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from gkt.config import CommonSettings


class GatewaySettings(CommonSettings):
    """Where the gateway listens, what it accepts, and when it pushes back."""

    gateway_addr: str = Field(default="127.0.0.1:50051", min_length=3, description="gRPC listen address.")
    gateway_api_keys_file: Path | None = Field(
        default=None,
        description="File of accepted API key hashes (`gkt hash-key`); unset: no authentication.",
    )
    gateway_metrics_port: int = Field(default=9101, ge=0, le=65535, description="Prometheus port (0 = off).")
    gateway_max_queue_depth: int = Field(
        default=1000,
        ge=1,
        description="Jobs waiting for a teacher beyond which new ones get RESOURCE_EXHAUSTED.",
    )
    gateway_default_timeout_s: float = Field(
        default=300.0, gt=0, description="Deadline of a request whose client set none."
    )
    gateway_grace_s: float = Field(
        default=10.0, ge=0, description="Shutdown: time in-flight RPCs get to finish."
    )
    gateway_max_query_chars: int = Field(default=8000, ge=1, description="Longest accepted query.")
    gateway_max_guidance_tokens: int = Field(
        default=512, ge=1, description="Largest max_guidance_tokens accepted."
    )
    gateway_max_new_tokens: int = Field(
        default=1024, ge=1, description="Largest student max_new_tokens accepted."
    )
    gateway_max_stop_sequences: int = Field(default=8, ge=0, description="Most stop strings per request.")
    gateway_max_stop_chars: int = Field(default=64, ge=1, description="Longest stop string.")
