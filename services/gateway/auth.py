"""API keys: `authorization: Bearer <key>` metadata checked against a file of SHA-256 hashes.

A line of the keys file is `sha256:<hex>` optionally followed by the key's name and its own limits,
`sha256:<hex> name=team-a rate=5/s burst=10 concurrency=4 queued=20`; limits a line leaves out take the
gateway's defaults (`GKT_GATEWAY_KEY_*`). Errors in the file name the line and the option, never the
text found there: a raw key pasted by mistake must not reach the logs.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from gkt.errors import Unauthenticated

_RATE = re.compile(r"^(?P<count>\d+(?:\.\d+)?)(?:/(?P<unit>s|m|h))?$")
_SECONDS_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}
_NAME = re.compile(r"^[\w.-]{1,64}$")


def hash_key(key: str) -> str:
    """The line to put in the keys file for `key` (the key itself is never stored)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One accepted key: its hash, a name for logs, and its own limits (None: the gateway default)."""

    digest: str
    name: str
    rate_per_s: float | None = None
    burst: int | None = None
    max_concurrent: int | None = None
    max_queued: int | None = None

    @property
    def key_id(self) -> str:
        """A stable identifier for Redis keys and logs that reveals nothing usable about the key."""
        return self.digest[:16]


ANONYMOUS = ApiKey(digest="anonymous", name="anonymous")
"""The identity of every caller when authentication is off: they share one budget."""


class ApiKeys:
    """The accepted keys, read once from a file: one
    `sha256:<hex> [name=… rate=… burst=… concurrency=… queued=…]` per line, `#` comments."""

    def __init__(self, keys: tuple[ApiKey, ...]) -> None:
        self._keys = keys

    @classmethod
    def from_file(cls, path: Path) -> ApiKeys:
        keys: dict[str, ApiKey] = {}
        for number, raw in enumerate(path.read_text().splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                key = _parse_line(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
            keys[key.digest] = key
        if not keys:
            raise ValueError(f"{path}: no API keys in the file")
        return cls(tuple(keys.values()))

    def check(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> ApiKey:
        """The key the metadata carries; Unauthenticated unless it is a known one."""
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if value is None:
            raise Unauthenticated("missing `authorization: Bearer <api key>` metadata")
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, key = text.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("authorization metadata must be `Bearer <api key>`")
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
        found = None
        for known in self._keys:  # compare with every key, so timing tells nothing about which matched
            if hmac.compare_digest(digest, known.digest):
                found = known
        if found is None:
            raise Unauthenticated("unknown API key")
        return found


_OPTIONS = ("name", "rate", "burst", "concurrency", "queued")


def _parse_line(line: str) -> ApiKey:
    first, *options = line.split()
    digest = first.removeprefix("sha256:")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(
            "the first word is not 'sha256:<64 lowercase hex digits>' (a raw key? store only "
            "`gkt hash-key`'s output)"
        )
    values: dict[str, str] = {}
    for position, option in enumerate(options, start=2):
        name, sep, value = option.partition("=")
        if not sep or name not in _OPTIONS or name in values:
            raise ValueError(
                f"word {position} is not one of {', '.join(o + '=' for o in _OPTIONS)} (or repeats one)"
            )
        values[name] = value
    name = values.get("name", digest[:8])
    if not _NAME.fullmatch(name):
        raise ValueError("name=: 1–64 letters, digits, '.', '_' or '-'")
    return ApiKey(
        digest=digest,
        name=name,
        rate_per_s=parse_rate(values["rate"]) if "rate" in values else None,
        burst=_count("burst", values["burst"]) if "burst" in values else None,
        max_concurrent=_count("concurrency", values["concurrency"]) if "concurrency" in values else None,
        max_queued=_count("queued", values["queued"]) if "queued" in values else None,
    )


def parse_rate(text: str) -> float:
    """Requests per second from `5`, `5/s`, `300/m` or `1000/h`; 0 means unlimited."""
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError("rate=: expected a number with an optional /s, /m or /h")
    return float(match["count"]) / _SECONDS_PER[match["unit"] or "s"]


def _count(option: str, text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{option}=: expected a whole number (0 = unlimited)")
    return int(text)
