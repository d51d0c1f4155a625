"""Dynamic batching: block for the first job, then fill the batch until full or `max_wait_ms` after it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis

from gkt.jobs import Job
from gkt.keys import TEACHER_GROUP, Keys
from gkt.queue import MAX_BLOCK_MS

log = logging.getLogger(__name__)

_CLAIM_MIN_IDLE_MS = 1000


@dataclass(frozen=True)
class Delivery:
    """A job as read from the query stream; `entry_id` is what gets acknowledged, `tenant` whose queue slot
    the job holds ("" for none)."""

    entry_id: str
    job: Job
    dequeued_at: float
    tenant: str = ""


async def collect_batch(
    redis: Redis, *, keys: Keys, consumer: str, max_batch_size: int, max_wait_ms: int, block_ms: int
) -> tuple[list[Delivery], list[str]]:
    """Return a batch, and the entry ids of unreadable entries (to be acknowledged and dropped).

    Waits up to `block_ms` for a first job; the batch then closes when it holds `max_batch_size`
    jobs or `max_wait_ms` after that first job arrived, whichever comes first.
    """
    batch: list[Delivery] = []
    broken: list[str] = []
    await _read(redis, keys, consumer, max_batch_size, block_ms, batch, broken)
    if not batch:
        return batch, broken
    closes_at = time.monotonic() + max_wait_ms / 1000
    while len(batch) < max_batch_size:
        remaining_ms = int((closes_at - time.monotonic()) * 1000)
        if remaining_ms <= 0:
            break
        await _read(redis, keys, consumer, max_batch_size - len(batch), remaining_ms, batch, broken)
    return batch, broken


async def claim_stale(
    redis: Redis, *, keys: Keys, consumer: str, min_idle_ms: int, count: int
) -> tuple[list[Delivery], list[str], dict[str, int]]:
    """Take over jobs another teacher read but never acknowledged (it died or hung).

    Returns the deliveries, unreadable ids, and how many times each entry has been delivered.
    """
    reply: Any = await redis.xautoclaim(
        keys.queries, TEACHER_GROUP, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count
    )
    claimed = reply[1]
    batch: list[Delivery] = []
    broken: list[str] = []
    _parse(claimed, batch, broken)
    counts: dict[str, int] = {}
    if claimed:
        log.warning("took over jobs left unacknowledged too long", extra={"jobs": len(claimed)})
    if batch:
        pending: Any = await redis.xpending_range(
            keys.queries,
            TEACHER_GROUP,
            min=batch[0].entry_id,
            max=batch[-1].entry_id,
            count=len(claimed) + 16,
        )
        counts = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
    return batch, broken, counts


async def claim_from_dead(
    redis: Redis, *, keys: Keys, consumer: str, count: int
) -> tuple[list[Delivery], list[str], dict[str, int]]:
    """Take over the jobs of teachers whose heartbeat is gone, and remove from the group the dead teachers
    that hold none (any more).

    Returns the deliveries, unreadable ids, and how many times each entry has been delivered. An entry is
    claimed only if idle for a second, so two teachers claiming at once never both take it.
    """
    consumers: Any = await redis.xinfo_consumers(keys.queries, TEACHER_GROUP)
    others = [(_text(c["name"]), int(c["pending"])) for c in consumers if _text(c["name"]) != consumer]
    if not others:
        return [], [], {}
    async with redis.pipeline(transaction=False) as pipe:
        for name, _ in others:
            pipe.exists(keys.heartbeat("teacher", name))
        alive = await pipe.execute()
    batch: list[Delivery] = []
    broken: list[str] = []
    counts: dict[str, int] = {}
    for (name, pending), beating in zip(others, alive, strict=True):
        if beating:
            continue
        if not pending:
            await redis.xgroup_delconsumer(keys.queries, TEACHER_GROUP, name)
            log.info("a dead teacher left the group", extra={"consumer": name})
            continue
        if len(batch) >= count:
            continue
        rows: Any = await redis.xpending_range(
            keys.queries, TEACHER_GROUP, min="-", max="+", count=count - len(batch), consumername=name
        )
        ids: list[Any] = [_text(row["message_id"]) for row in rows]
        claimed: Any = await redis.xclaim(
            keys.queries, TEACHER_GROUP, consumer, min_idle_time=_CLAIM_MIN_IDLE_MS, message_ids=ids
        )
        _parse([entry for entry in claimed if entry and entry[1] is not None], batch, broken)
        # XCLAIM counts one more delivery
        counts.update({_text(row["message_id"]): int(row["times_delivered"]) + 1 for row in rows})
        log.warning("took over a dead teacher's jobs", extra={"consumer": name, "jobs": len(claimed)})
    return batch, broken, counts


async def _read(
    redis: Redis,
    keys: Keys,
    consumer: str,
    count: int,
    block_ms: int,
    batch: list[Delivery],
    broken: list[str],
) -> None:
    reply: Any = await redis.xreadgroup(
        TEACHER_GROUP, consumer, {keys.queries: ">"}, count=count, block=min(max(block_ms, 1), MAX_BLOCK_MS)
    )
    for _stream, entries in reply or []:
        _parse(entries, batch, broken)


def _parse(entries: list[Any], batch: list[Delivery], broken: list[str]) -> None:
    now = time.time()
    for entry_id, fields in entries:
        entry = _text(entry_id)
        try:
            batch.append(
                Delivery(
                    entry_id=entry,
                    job=Job.model_validate_json(fields[b"job"]),
                    dequeued_at=now,
                    tenant=_text(fields.get(b"tenant", b"")),
                )
            )
        except (KeyError, ValidationError, TypeError):
            log.error("unreadable query entry dropped", extra={"entry_id": entry})
            broken.append(entry)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value
