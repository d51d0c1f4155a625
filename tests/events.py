"""Reading a job's event stream back in tests."""

from __future__ import annotations

from typing import Any

from redis import Redis

from gkt.jobs import decode_event
from gkt.keys import Keys
from gkt.queue import AnyEvent


def job_events(redis: Redis, keys: Keys, job_id: str) -> list[tuple[int, AnyEvent]]:
    """Every event of a job in order, each with the Redis server time (ms) it was added at."""
    entries: Any = redis.xrange(keys.events(job_id))
    return [(int(entry_id.split(b"-")[0]), decode_event(fields[b"e"])) for entry_id, fields in entries]
