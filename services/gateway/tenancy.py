"""Whose call this is: the tenant that access control identified, handed on to the service."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True)
class Tenant:
    """An API key as the service sees it (every caller is one tenant, "anonymous", without keys).

    `id` names the tenant's Redis keys and reveals nothing usable about the key; `max_queued` is how
    many of its jobs may wait for a teacher at once (0 = no limit of its own).
    """

    id: str
    name: str
    max_queued: int = 0


_current: contextvars.ContextVar[Tenant] = contextvars.ContextVar("gkt_tenant")


def enter(tenant: Tenant) -> None:
    """Make `tenant` the caller of the RPC running in this task."""
    _current.set(tenant)


def current() -> Tenant:
    """The caller of the RPC running in this task; LookupError when access control did not run, so a
    call is never served under someone else's name."""
    return _current.get()
