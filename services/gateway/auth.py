"""API keys: `authorization: Bearer <key>` metadata checked against a file of SHA-256 hashes."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from gkt.errors import Unauthenticated


def hash_key(key: str) -> str:
    """The line to put in the keys file for `key` (the key itself is never stored)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """The accepted keys, read once from a file: one `sha256:<hex>` per line, `#` comments."""

    def __init__(self, hashes: frozenset[str]) -> None:
        self._hashes = hashes

    @classmethod
    def from_file(cls, path: Path) -> ApiKeys:
        hashes = set()
        for number, raw in enumerate(path.read_text().splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            digest = line.removeprefix("sha256:")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(
                    f"{path}:{number}: expected 'sha256:<64 hex digits>' (make one with `gkt hash-key`)"
                )
            hashes.add(digest)
        if not hashes:
            raise ValueError(f"{path}: no API keys in the file")
        return cls(frozenset(hashes))

    def check(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> None:
        """Raise Unauthenticated unless the metadata carries a known key."""
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if value is None:
            raise Unauthenticated("missing `authorization: Bearer <api key>` metadata")
        text = value.decode() if isinstance(value, bytes) else value
        scheme, _, key = text.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated("authorization metadata must be `Bearer <api key>`")
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
        if not any(hmac.compare_digest(digest, known) for known in self._hashes):
            raise Unauthenticated("unknown API key")
