"""How a command-line client reaches a gateway: its address, plaintext or TLS, and the API key it sends."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

API_KEY_ENV = "GKT_API_KEY"
DEFAULT_GATEWAY_ADDR = "127.0.0.1:50051"
CONNECTION_ENV_HELP = (
    f"  {API_KEY_ENV:<22} API key sent as `authorization: Bearer` (unless --api-key-file is given)\n"
    "  GKT_GATEWAY_ADDR       the gateway's address (default of --addr)"
)


class ConnectionOptionError(ValueError):
    """A connection option cannot be used as given (a missing file, a certificate without its key)."""


def add_connection_arguments(
    parser: argparse.ArgumentParser, *, default_addr: str, title: str = "connecting to the gateway"
) -> None:
    group = parser.add_argument_group(title)
    group.add_argument(
        "--addr", default=default_addr, metavar="HOST:PORT", help=f"the gateway (default: {default_addr})"
    )
    group.add_argument(
        "--tls", action="store_true", help="speak TLS, trusting the system's CAs (or those of --ca-file)"
    )
    group.add_argument(
        "--ca-file", "--tls-ca", type=Path, metavar="PEM", help="CA bundle to trust; implies --tls"
    )
    group.add_argument(
        "--cert-file", "--tls-cert", type=Path, metavar="PEM", help="client certificate for mutual TLS"
    )
    group.add_argument("--key-file", "--tls-key", type=Path, metavar="PEM", help="private key of --cert-file")
    group.add_argument(
        "--api-key-file",
        type=Path,
        metavar="FILE",
        help=f"file holding the API key (default: ${API_KEY_ENV}); never pass a key on the command line",
    )


@dataclass(frozen=True)
class GatewayConnection:
    """Everything needed to open a channel to a gateway and authenticate to it."""

    addr: str
    credentials: grpc.ChannelCredentials | None = None
    """TLS credentials; None for plaintext."""
    api_key: str | None = None

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, *, environ: Mapping[str, str] = os.environ
    ) -> GatewayConnection:
        """The connection the options of `add_connection_arguments` describe; the files are read now."""
        if (args.cert_file is None) != (args.key_file is None):
            raise ConnectionOptionError("--cert-file and --key-file go together (mutual TLS needs both)")
        credentials = None
        if args.tls or args.ca_file or args.cert_file:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(args.ca_file, "--ca-file"),
                private_key=_read(args.key_file, "--key-file"),
                certificate_chain=_read(args.cert_file, "--cert-file"),
            )
        if args.api_key_file is not None:
            api_key = (_read(args.api_key_file, "--api-key-file") or b"").decode().strip()
        else:
            api_key = environ.get(API_KEY_ENV, "").strip()
        return cls(addr=args.addr, credentials=credentials, api_key=api_key or None)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else None

    def open(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.addr)
        return grpc.secure_channel(self.addr, self.credentials)


def _read(path: Path | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConnectionOptionError(f"{option} {path}: {exc.strerror or exc}") from exc
