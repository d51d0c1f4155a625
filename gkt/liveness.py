"""Who is alive and how fast: each worker's heartbeat (written by one function, read by one) and each
teacher's pace, from which gateways estimate a new job's wait."""

from __future__ import annotations

import time
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

PACE_FRESH_S = 120.0
"""A teacher's pace older than this is ignored (it stopped, or has had no batch to time)."""


def teacher_pace(*, batch_s: float, max_batch_size: int, at: float) -> str:
    """A teacher's `Keys.teacher_pace` field value."""
    return f"{batch_s:.6f} {max_batch_size} {at:.3f}"


HEARTBEAT_TTL_S = 60
"""A student's heartbeat key lives this long: a worker silent for longer counts as gone (a teacher's lives
GKT_TEACHER_HEARTBEAT_TTL_S)."""
HEARTBEAT_EVERY_S = 5.0
"""How often a worker rewrites its heartbeat, from a timer, whether or not it has work."""


def heartbeat_value(*, at: float, busy: int | None = None, capacity: int | None = None) -> str:
    """A `Keys.heartbeat` value: "<epoch seconds>", and for a student "<jobs running> <jobs at once>"."""
    if busy is None or capacity is None:
        return f"{at:.3f}"
    return f"{at:.3f} {busy} {capacity}"


def parse_heartbeat(value: str | bytes) -> tuple[float, int | None, int | None]:
    """(epoch seconds, jobs running, jobs at once) of a `heartbeat_value`; None where it says nothing."""
    parts = _text(value).split()
    if len(parts) == 3:
        return float(parts[0]), int(parts[1]), int(parts[2])
    return float(parts[0]), None, None


def teacher_capacity(paces: dict[Any, Any], *, now: float) -> float:
    """Jobs per second the teachers clear when their batches are full: the sum over fresh paces of
    max batch size / seconds per batch; 0 when no teacher has a fresh pace."""
    capacity = 0.0
    for value in paces.values():
        batch_s, max_batch, at = (float(part) for part in _text(value).split())
        if batch_s > 0 and now - at <= PACE_FRESH_S:
            capacity += max_batch / batch_s
    return capacity


def write_heartbeat(
    redis: Redis | AsyncRedis, *, key: str, ttl_s: float, busy: int | None = None, capacity: int | None = None
) -> Any:
    """Say the worker of `key` is alive now, for `ttl_s`; a student adds its jobs running and its capacity.
    Returns the client's reply: an awaitable for an async client."""
    value = heartbeat_value(at=time.time(), busy=busy, capacity=capacity)
    return redis.set(key, value, px=max(1, round(ttl_s * 1000)))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
