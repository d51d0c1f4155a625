"""The Redis layout: the query stream, each job's event stream, and the keys around them.

Every key a job creates expires after the job TTL; the query stream holds only jobs not yet
acknowledged by a teacher (acknowledged entries are deleted), so nothing grows without bound.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gkt.jobs import DeltaEvent, ErrorEvent, FinalEvent, GuidanceEvent, Job, decode_event, encode_event

log = logging.getLogger(__name__)

TEACHER_GROUP = "teachers"
STUDENT_QUEUE = "student"
STUDENT_TASK = "gkt.student.complete"
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

# A bounded set of expiring members (ZSET scored by expiry, Redis's clock): returns 1 when ARGV[3] was
# added, 0 when the set holds ARGV[1] members that have not expired. A member lives ARGV[2] ms.
TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""


@dataclass(frozen=True)
class Keys:
    """Names of every Redis key, under one prefix."""

    prefix: str = "gkt"

    @property
    def queries(self) -> str:
        return f"{self.prefix}:queries"

    @property
    def student_queue(self) -> str:
        """The Redis list of Celery's student queue: kombu puts `{prefix}:` before every key it makes
        (`gkt.config.celery_broker`), so the queue named STUDENT_QUEUE is this list."""
        return f"{self.prefix}:{STUDENT_QUEUE}"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:deadletter"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def final(self, job_id: str) -> str:
        return f"{self.prefix}:final:{job_id}"

    def attempts(self, job_id: str) -> str:
        return f"{self.prefix}:attempts:{job_id}"

    @property
    def cancellations(self) -> str:
        """Pub/sub channel of cancelled job ids (the `cancelled` key stays the durable record)."""
        return f"{self.prefix}:cancellations"

    def cancelled(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def request(self, tenant: str, request_id: str) -> str:
        """A request id's job, within its tenant: the same id from another API key is another request."""
        return f"{self.prefix}:request:{tenant}:{request_id}"

    def queued(self, tenant: str) -> str:
        """A tenant's jobs waiting for a teacher: a sorted set of job ids scored by their deadline."""
        return f"{self.prefix}:queued:{tenant}"

    def heartbeat(self, role: str, name: str) -> str:
        return f"{self.prefix}:heartbeat:{role}:{name}"

    @property
    def teacher_read(self) -> str:
        """When a teacher last read the query stream (epoch seconds): the gateway's degraded-mode signal."""
        return f"{self.prefix}:teacher:last-read"

    @property
    def teacher_pace(self) -> str:
        """A hash, one field per teacher: "<seconds per batch> <max batch size> <epoch seconds>"."""
        return f"{self.prefix}:teacher:pace"

    def rate(self, key_id: str) -> str:
        """An API key's rate-limit state (GCRA: the theoretical arrival time)."""
        return f"{self.prefix}:ratelimit:{key_id}"

    def leases(self, key_id: str) -> str:
        """An API key's in-flight RPCs: a sorted set of lease ids scored by their deadline."""
        return f"{self.prefix}:leases:{key_id}"

    def job_lease(self, job_id: str) -> str:
        """The student running a job (its owner id), expiring unless renewed (`gkt.leases`)."""
        return f"{self.prefix}:job-lease:{job_id}"

    @property
    def student_running(self) -> str:
        """A hash: job id → the task arguments of each job a student has claimed and not released."""
        return f"{self.prefix}:student:running"

    @property
    def student_dispatched(self) -> str:
        """A hash: job id → the task arguments of each job sent to the students and not yet claimed."""
        return f"{self.prefix}:student:dispatched"

    @property
    def student_dispatched_at(self) -> str:
        """A sorted set: the jobs of `student_dispatched`, scored by when they were sent (epoch seconds)."""
        return f"{self.prefix}:student:dispatched-at"


async def ensure_group(redis: AsyncRedis, *, keys: Keys) -> None:
    """Create the teachers' consumer group (and the stream) if they do not exist yet."""
    try:
        await redis.xgroup_create(keys.queries, TEACHER_GROUP, id="0", mkstream=True)
    except Exception as exc:  # BUSYGROUP: it exists already
        if "BUSYGROUP" not in str(exc):
            raise


PACE_FRESH_S = 120.0
"""A teacher's pace older than this is ignored (it stopped, or has had no batch to time)."""


def teacher_pace(*, batch_s: float, max_batch_size: int, at: float) -> str:
    """A teacher's `Keys.teacher_pace` field value."""
    return f"{batch_s:.6f} {max_batch_size} {at:.3f}"


HEARTBEAT_TTL_S = 60
"""A worker's heartbeat key lives this long: a worker silent for longer counts as gone."""
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
                _add_final(pipe, keys=keys, job_id=job_id, event=event, ttl_s=ttl_s)
                continue
            pipe.xadd(keys.events(job_id), {"e": encode_event(event)}, maxlen=EVENTS_MAXLEN, approximate=True)
            pipe.expire(keys.events(job_id), ttl_s)
        await pipe.execute()


async def publish_final(
    redis: AsyncRedis, *, keys: Keys, job_id: str, event: FinalEvent | ErrorEvent, ttl_s: int
) -> bool:
    """Publish a job's last event unless one was published already; True if this call did."""
    async with redis.pipeline(transaction=False) as pipe:
        _add_final(pipe, keys=keys, job_id=job_id, event=event, ttl_s=ttl_s)
        (done,) = await pipe.execute()
    return bool(done)


def _add_final(pipe: Any, *, keys: Keys, job_id: str, event: FinalEvent | ErrorEvent, ttl_s: int) -> None:
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


_HEARD_MAX = 10_000


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _log_listener_error(exc: BaseException, pubsub: Any, thread: Any) -> None:
    """Keep listening through a Redis outage (redis-py reconnects on the next read)."""
    log.warning("cancellation listener: %s", exc)
    time.sleep(1.0)


class SyncEventPublisher:
    """The student side: publishes a job's events from a synchronous Celery task."""

    def __init__(self, redis: Redis, *, keys: Keys, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self._heard: dict[str, None] = {}  # cancelled job ids heard on the channel, oldest first
        self._listener: Any = None

    def watch_cancellations(self) -> None:
        """Listen for cancellations in a background thread, so that checking one between two tokens
        costs no Redis round trip (`heard_cancel`). The durable key is still read at every publish, so
        a cancellation missed here (sent before the subscription, or while Redis was away) still stops
        the job at the next delta."""
        if self._listener is not None:
            return
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(**{self.keys.cancellations: self._on_cancel})
        self._listener = pubsub.run_in_thread(
            sleep_time=1.0, daemon=True, exception_handler=_log_listener_error
        )

    def stop_watching(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    def heard_cancel(self, job_id: str) -> bool:
        return job_id in self._heard

    def _on_cancel(self, message: dict[str, Any]) -> None:
        self._heard[_text(message["data"])] = None
        while len(self._heard) > _HEARD_MAX:
            del self._heard[next(iter(self._heard))]

    def publish(self, job_id: str, event: AnyEvent, *, check_cancel: bool = False) -> bool:
        """Publish an event; returns True when the job was cancelled (checked in the same round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(
            self.keys.events(job_id), {"e": encode_event(event)}, maxlen=EVENTS_MAXLEN, approximate=True
        )
        pipe.expire(self.keys.events(job_id), self.ttl_s)
        if check_cancel:
            pipe.exists(self.keys.cancelled(job_id))
        replies: list[Any] = pipe.execute()
        return bool(check_cancel and replies[-1])

    def cancelled(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys.cancelled(job_id)))

    def begin(self, job_id: str) -> tuple[bool, int]:
        """Whether the job is answered already, and this delivery's number (redeliveries after a worker
        died included), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.keys.final(job_id))
        pipe.incr(self.keys.attempts(job_id))
        pipe.expire(self.keys.attempts(job_id), self.ttl_s)
        finished, attempt, _ = pipe.execute()
        return bool(finished), int(attempt)

    def publish_final(
        self, job_id: str, event: FinalEvent | ErrorEvent, *, after: DeltaEvent | None = None
    ) -> bool:
        """Publish a job's last event unless it has one; True if this call did. `after`: the job's last
        delta, published just before it in the same round trip."""
        pipe = self.redis.pipeline(transaction=False)
        if after is not None:
            pipe.xadd(
                self.keys.events(job_id), {"e": encode_event(after)}, maxlen=EVENTS_MAXLEN, approximate=True
            )
        _add_final(pipe, keys=self.keys, job_id=job_id, event=event, ttl_s=self.ttl_s)
        return bool(pipe.execute()[-1])

    def dead_letter(self, job: Job, *, reason: str) -> None:
        """Keep a job that keeps failing for inspection (the stream is capped)."""
        self.redis.xadd(
            self.keys.dead_letters,
            {"job": job.model_dump_json(), "reason": reason},
            maxlen=DEAD_LETTERS_MAXLEN,
            approximate=True,
        )
