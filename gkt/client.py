"""A gateway client's connection: its address, plaintext or TLS, and the API key it sends."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

DEFAULT_GATEWAY_ADDR = "127.0.0.1:50051"


@dataclass(frozen=True)
class GatewayConnection:
    """Everything needed to open a channel to a gateway and authenticate to it."""

    addr: str
    credentials: grpc.ChannelCredentials | None = None
    """TLS credentials; None for plaintext."""
    api_key: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else None

    def open(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.addr)
        return grpc.secure_channel(self.addr, self.credentials)
