"""The gateway's settings (`GKT_GATEWAY_*` and the common `GKT_*`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from gkt.config import CommonSettings

_FIELD_HEADER_BYTES = 4
"""A string field's tag and length prefix, at most (lengths below 2 MiB)."""
_OTHER_FIELDS_BYTES = 512
"""request_id (128 characters of ASCII), task, guidance and the numeric sampling fields, with headers."""


class GatewaySettings(CommonSettings):
    """Where the gateway listens, whom it admits, what it accepts, and when it pushes back."""

    gateway_addr: str = Field(default="127.0.0.1:50051", min_length=3, description="gRPC listen address.")
    gateway_api_keys_file: Path | None = Field(
        default=None,
        description="File of accepted API key hashes (`gkt hash-key`), each optionally with its own "
        "limits; unset: no authentication.",
    )
    gateway_key_rate_per_s: float = Field(
        default=0.0, ge=0, description="Requests per second each API key may send (0 = unlimited)."
    )
    gateway_key_burst: int = Field(
        default=0,
        ge=0,
        description="Requests a key may send at once on top of its rate (0 = one second's worth, at least 1).",
    )
    gateway_key_max_concurrent: int = Field(
        default=0, ge=0, description="RPCs each API key may have in flight at once (0 = unlimited)."
    )
    gateway_key_max_queued: int = Field(
        default=100,
        ge=0,
        description="Jobs each API key may have waiting for a teacher at once, cancelled ones included until "
        "a teacher drops them (0 = unlimited): one tenant's burst cannot fill the whole queue.",
    )
    gateway_lease_ttl_s: float = Field(
        default=30.0,
        ge=0.3,
        le=3600,
        description="Lifetime of a concurrency lease, renewed every third of it while its RPC runs: how long "
        "the leases of a gateway that died keep counting.",
    )
    gateway_max_request_bytes: int = Field(
        default=0,
        ge=0,
        description="Largest request message accepted, refused (RESOURCE_EXHAUSTED) before it is parsed; "
        "0 = the longest valid request under the query and stop limits.",
    )
    gateway_max_concurrent_streams: int = Field(
        default=100, ge=1, description="Concurrent RPCs one client connection may carry."
    )
    gateway_max_connection_idle_s: float = Field(
        default=120.0,
        gt=0,
        description="A connection without an RPC for this long is closed (clients reconnect when needed).",
    )
    gateway_max_connection_age_s: float = Field(
        default=1800.0,
        gt=0,
        description="A connection this old is asked to close; its RPCs then get gateway_default_timeout_s "
        "to finish (spreads clients over replicas as they scale).",
    )
    gateway_health_addr: str = Field(
        default="",
        description="A second, plaintext address serving only gRPC health checks (empty = none): for "
        "Kubernetes probes, which cannot speak TLS, when the API port does.",
    )
    gateway_tls_cert_file: Path | None = Field(
        default=None, description="PEM certificate (chain) of the gRPC port; unset: plaintext."
    )
    gateway_tls_key_file: Path | None = Field(
        default=None, description="PEM private key of `gateway_tls_cert_file`."
    )
    gateway_tls_client_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS).",
    )
    gateway_metrics_port: int = Field(default=9101, ge=0, le=65535, description="Prometheus port (0 = off).")
    gateway_max_queue_depth: int = Field(
        default=1000,
        ge=1,
        description="Jobs waiting for a teacher beyond which new ones get RESOURCE_EXHAUSTED.",
    )
    gateway_admit_by_wait: bool = Field(
        default=True,
        description="Refuse (RESOURCE_EXHAUSTED) a job whose deadline passes before the teachers can reach "
        "it, estimated from the queue ahead and the teachers' measured seconds per batch.",
    )
    gateway_max_in_flight: int = Field(
        default=2000,
        ge=1,
        description="API calls one gateway process serves at once; more get RESOURCE_EXHAUSTED at once.",
    )
    gateway_redis_max_connections: int = Field(
        default=32,
        ge=2,
        le=10_000,
        description="Redis connections one gateway process uses for commands (its event reader holds one "
        "more); a command waits for a free one, and a call that waits too long gets RESOURCE_EXHAUSTED.",
    )
    gateway_redis_wait_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest wait for a free Redis connection before a call gets RESOURCE_EXHAUSTED.",
    )
    gateway_default_timeout_s: float = Field(
        default=300.0, gt=0, description="Deadline of a request whose client set none."
    )
    gateway_grace_s: float = Field(
        default=10.0, ge=0, description="Shutdown: time in-flight RPCs get to finish."
    )
    gateway_degraded_after_s: float = Field(
        default=0.0,
        ge=0,
        description="When no teacher has read the query stream for this long, answer student-only "
        "(0 = never); set it above the longest teacher batch.",
    )
    gateway_max_query_chars: int = Field(default=8000, ge=1, description="Longest accepted query.")
    gateway_max_prompt_chars: int = Field(
        default=16000,
        ge=1,
        description="Longest model prompt (the task's few-shot exemplars plus the query), in characters: "
        "the gateway has no tokenizer; the workers check tokens against their model's context.",
    )
    gateway_max_new_tokens: int = Field(
        default=1024, ge=1, description="Largest student max_new_tokens accepted."
    )
    gateway_max_stop_sequences: int = Field(default=8, ge=0, description="Most stop strings per request.")
    gateway_max_stop_chars: int = Field(default=64, ge=1, description="Longest stop string.")

    @property
    def longest_valid_request_bytes(self) -> int:
        """An upper bound of a valid request's size: every string at its longest in 4-byte UTF-8."""
        stops = self.gateway_max_stop_sequences * (4 * self.gateway_max_stop_chars + _FIELD_HEADER_BYTES)
        return 4 * self.gateway_max_query_chars + _FIELD_HEADER_BYTES + stops + _OTHER_FIELDS_BYTES

    @property
    def max_request_bytes(self) -> int:
        return self.gateway_max_request_bytes or self.longest_valid_request_bytes

    @model_validator(mode="after")
    def _room_for_a_valid_request(self) -> GatewaySettings:
        if (
            self.gateway_max_request_bytes
            and self.gateway_max_request_bytes < self.longest_valid_request_bytes
        ):
            raise ValueError(
                f"gateway_max_request_bytes={self.gateway_max_request_bytes} would refuse valid requests of "
                f"up to {self.longest_valid_request_bytes} bytes (gateway_max_query_chars="
                f"{self.gateway_max_query_chars}, gateway_max_stop_sequences={self.gateway_max_stop_sequences}, "
                f"gateway_max_stop_chars={self.gateway_max_stop_chars}); raise it or set 0"
            )
        return self

    @model_validator(mode="after")
    def _tls_files_come_together(self) -> GatewaySettings:
        if (self.gateway_tls_cert_file is None) != (self.gateway_tls_key_file is None):
            raise ValueError(
                "gateway_tls_cert_file and gateway_tls_key_file go together: "
                f"cert={self.gateway_tls_cert_file}, key={self.gateway_tls_key_file}"
            )
        if self.gateway_tls_client_ca_file is not None and self.gateway_tls_cert_file is None:
            raise ValueError(
                "gateway_tls_client_ca_file (mutual TLS) needs gateway_tls_cert_file and _key_file"
            )
        return self
