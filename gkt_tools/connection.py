"""The connection options of the commands that call a gateway (`gkt ask`, `gkt eval live`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc

from gkt.client import GatewayConnection

CONNECTION_ENV_HELP = (
    "  GKT_API_KEY            API key sent as `authorization: Bearer` (unless --api-key-file is given)\n"
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
        help="file holding the API key (default: $GKT_API_KEY); never pass a key on the command line",
    )


def connection_from_args(args: argparse.Namespace, *, api_key: str | None) -> GatewayConnection:
    """The connection the options of `add_connection_arguments` describe; the files are read now.
    `api_key`: the key of the environment (GKT_API_KEY), used unless --api-key-file names another."""
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
        api_key = (_read(args.api_key_file, "--api-key-file") or b"").decode().strip() or None
    return GatewayConnection(addr=args.addr, credentials=credentials, api_key=api_key)


def _read(path: Path | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConnectionOptionError(f"{option} {path}: {exc.strerror or exc}") from exc
