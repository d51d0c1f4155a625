"""The query stream (gateways add jobs, teachers read them in a consumer group) and each job's event stream
(guidance, deltas, one last event), with the dead letters of jobs that kept failing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from gkt.jobs import DeltaEvent, ErrorEvent, FinalEvent, GuidanceEvent, Job, decode_event, encode_event
from gkt.keys import TEACHER_GROUP, Keys

EVENTS_MAXLEN = 4096
MAX_BLOCK_MS = 1000
"""The longest blocking read; well inside the socket timeout, so an idle wait is never a timeout."""
DEAD_LETTERS_MAXLEN = 10_000

AnyEvent = GuidanceEvent | DeltaEvent | FinalEvent | ErrorEvent

# Publish the final event at most once per job, even when a redelivered task finishes twice.
_PUBLISH_FINAL = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


async def ensure_group(redis: AsyncRedis, *, keys: Keys) -> None:
    """Create the teachers' consumer group (and the stream) if they do not exist yet."""
    try:
        await redis.xgroup_create(keys.queries, TEACHER_GROUP, id="0", mkstream=True)
    except Exception as exc:  # BUSYGROUP: it exists already
        if "BUSYGROUP" not in str(exc):
            raise


async def enqueue_job(redis: AsyncRedis, *, keys: Keys, job: Job, tenant: str = "") -> str:
    """Add a job to the query stream; returns its stream entry id. `tenant` travels beside the job, so
    the teacher that takes it can free the tenant's queue slot (`Keys.queued`)."""
    entry_id: Any = await redis.xadd(keys.queries, {"job": job.model_dump_json(), "tenant": tenant})
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def cancelled_jobs(redis: AsyncRedis, *, keys: Keys, job_ids: Sequence[str]) -> set[str]:
    """Which of these jobs carry the durable cancel mark, in one round trip."""
    if not job_ids:
        return set()
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.exists(keys.cancelled(job_id))
        marks = await pipe.execute()
    return {job_id for job_id, mark in zip(job_ids, marks, strict=True) if mark}


async def publish_event(redis: AsyncRedis, *, keys: Keys, job_id: str, event: AnyEvent, ttl_s: int) -> None:
    await publish_events(redis, keys=keys, events=[(job_id, event)], ttl_s=ttl_s)


async def publish_events(
    redis: AsyncRedis, *, keys: Keys, events: Sequence[tuple[str, AnyEvent]], ttl_s: int
) -> None:
    """Publish events of many jobs, in order, in one round trip. A last event (final or error) is
    published only if its job has none yet, as `publish_final` does."""
    if not events:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for job_id, event in events:
            if isinstance(event, FinalEvent | ErrorEvent):
                add_final(pipe, keys=keys, job_id=job_id, event=event, ttl_s=ttl_s)
                continue
            pipe.xadd(keys.events(job_id), {"e": encode_event(event)}, maxlen=EVENTS_MAXLEN, approximate=True)
            pipe.expire(keys.events(job_id), ttl_s)
        await pipe.execute()


async def publish_final(
    redis: AsyncRedis, *, keys: Keys, job_id: str, event: FinalEvent | ErrorEvent, ttl_s: int
) -> bool:
    """Publish a job's last event unless one was published already; True if this call did."""
    async with redis.pipeline(transaction=False) as pipe:
        add_final(pipe, keys=keys, job_id=job_id, event=event, ttl_s=ttl_s)
        (done,) = await pipe.execute()
    return bool(done)


def add_final(pipe: Any, *, keys: Keys, job_id: str, event: FinalEvent | ErrorEvent, ttl_s: int) -> None:
    """Queue on `pipe` (sync or async) the script that publishes a job's last event unless it has one."""
    script_keys = [keys.events(job_id), keys.final(job_id)]
    pipe.eval(_PUBLISH_FINAL, 2, *script_keys, encode_event(event), ttl_s, EVENTS_MAXLEN)


async def read_events(
    redis: AsyncRedis, *, keys: Keys, job_id: str, after: str, block_ms: int
) -> list[tuple[str, AnyEvent]]:
    """Events of one job after entry id `after`, waiting up to `block_ms` (≤ MAX_BLOCK_MS) for the first."""
    reply: Any = await redis.xread({keys.events(job_id): after}, block=min(block_ms, MAX_BLOCK_MS), count=256)
    events: list[tuple[str, AnyEvent]] = []
    for _stream, entries in reply or []:
        for entry_id, fields in entries:
            events.append((entry_id.decode(), decode_event(fields[b"e"])))
    return events


def add_dead_letter(pipe: Any, *, keys: Keys, job: Job, reason: str) -> None:
    """Queue on `pipe` (sync or async) the record of a job given up after repeated failures (the stream is
    capped), for inspection."""
    pipe.xadd(
        keys.dead_letters,
        {"job": job.model_dump_json(), "reason": reason},
        maxlen=DEAD_LETTERS_MAXLEN,
        approximate=True,
    )
