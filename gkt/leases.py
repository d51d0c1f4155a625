"""Job leases: no student job is lost, whether its task or its student dies.

1. The teacher records each job it sends to the students (`record_dispatched`), before sending it.
2. A student claims a job before generating it: the claim fails when the job is answered already or
   another student holds its lease; it moves the job from `dispatched` to `running`.
3. While the job runs, its student renews the lease every few seconds, and releases it at the end.
4. Any student's sweeper (`sweep`) takes, atomically so that exactly one does, the jobs to send again:
   running jobs whose lease expired (their student died), and dispatched jobs nobody claimed within
   the redelivery time while the task queue is empty (their task was lost: a Redis list pop is
   destructive, so a worker killed while the pop's reply is on the wire takes the task with it). A job
   sent to the own queue of the student that prepared it (its `prepared` key says so) is sent again
   after the redelivery time whatever the shared queue holds: that student may be dead, and then its
   queue is never emptied; when it is not alive (its `alive` key expired), the sweeper deletes that
   queue in the same step, so a student that never comes back leaves no tasks behind in Redis.
A student that missed renewals long enough for its lease to be taken learns so at its next renewal
and drops the job without publishing. A job sent twice is run once: the second claim fails.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gkt.keys import Keys

# KEYS: final, lease, attempts, running, dispatched, dispatched-at. ARGV: owner, lease ms, payload, job id, ttl s.
_CLAIM = """
redis.call('HDEL', KEYS[5], ARGV[4])
redis.call('ZREM', KEYS[6], ARGV[4])
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {-1, 0} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local attempt = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('HSET', KEYS[4], ARGV[4], ARGV[3])
return {1, attempt}
"""

# KEYS: the leases. ARGV: lease ms, then one owner per lease. Returns 1 per lease still ours, else 0.
_RENEW = """
local kept = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
    kept[i] = 1
  else
    kept[i] = 0
  end
end
return kept
"""

# KEYS: running, lease. ARGV: job id, owner.
_RELEASE = """
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# KEYS: running, dispatched, dispatched-at, the task queue. ARGV: the lease key prefix and the final
# key prefix (job id appended), the newest dispatch time to send again, the oldest worth keeping, the
# prepared key prefix (job id appended), the alive key prefix and the queue list prefix (queue appended).
_SWEEP = """
local taken = {}
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local job_id, payload = entries[i], entries[i + 1]
  if redis.call('EXISTS', ARGV[1] .. job_id) == 0 then
    redis.call('HDEL', KEYS[1], job_id)
    table.insert(taken, payload)
  end
end
local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[3], 'LIMIT', 0, 100)
local queue_empty = redis.call('LLEN', KEYS[4]) == 0
for _, job_id in ipairs(stale) do
  local answered = redis.call('EXISTS', ARGV[2] .. job_id) == 1
  local running = redis.call('EXISTS', ARGV[1] .. job_id) == 1
  local expired = tonumber(redis.call('ZSCORE', KEYS[3], job_id)) < tonumber(ARGV[4])
  local own_queue = redis.call('GET', ARGV[5] .. job_id)
  if own_queue and redis.call('EXISTS', ARGV[6] .. own_queue) == 0 then
    redis.call('DEL', ARGV[7] .. own_queue)
  end
  if answered or running or expired or queue_empty or own_queue then
    local payload = redis.call('HGET', KEYS[2], job_id)
    redis.call('HDEL', KEYS[2], job_id)
    redis.call('ZREM', KEYS[3], job_id)
    if payload and not (answered or running or expired) then table.insert(taken, payload) end
  end
end
return taken
"""


# KEYS: the jobs' prepared keys. ARGV: the alive key prefix (queue appended). Each job's queue when the
# student that prepared it is alive, else false.
_ROUTES = """
local queues = {}
for i, key in ipairs(KEYS) do
  local queue = redis.call('GET', key)
  if queue and redis.call('EXISTS', ARGV[1] .. queue) == 1 then queues[i] = queue else queues[i] = false end
end
return queues
"""


class Claim(Enum):
    RUN = "run"
    ANSWERED = "answered"
    HELD = "held"
    """Another student holds the job's lease and is running it."""


@dataclass(frozen=True)
class Lease:
    job_id: str
    owner: str
    attempt: int


@dataclass(frozen=True)
class Orphan:
    """A job whose student stopped renewing its lease: its task's arguments, to send again."""

    job_json: str
    guidance_json: str


def claim(
    redis: Redis, *, keys: Keys, job_id: str, owner: str, payload: Orphan, lease_s: float, ttl_s: int
) -> tuple[Claim, Lease | None]:
    """Take the job's lease (and count this delivery), unless it is answered or held by another."""
    body = _body(payload)
    script_keys = [
        keys.final(job_id),
        keys.job_lease(job_id),
        keys.attempts(job_id),
        keys.student_running,
        keys.student_dispatched,
        keys.student_dispatched_at,
    ]
    status, attempt = redis.eval(
        _CLAIM, len(script_keys), *script_keys, owner, int(lease_s * 1000), body, job_id, ttl_s
    )
    if status == 0:
        return Claim.ANSWERED, None
    if status == -1:
        return Claim.HELD, None
    return Claim.RUN, Lease(job_id=job_id, owner=owner, attempt=int(attempt))


def renew(redis: Redis, *, keys: Keys, leases: Sequence[Lease], lease_s: float) -> list[Lease]:
    """Extend every lease still held; returns the ones lost (taken over by another student)."""
    if not leases:
        return []
    lease_keys = [keys.job_lease(lease.job_id) for lease in leases]
    kept: Any = redis.eval(
        _RENEW, len(leases), *lease_keys, int(lease_s * 1000), *(lease.owner for lease in leases)
    )
    return [lease for lease, ok in zip(leases, kept, strict=True) if not ok]


def release(redis: Redis, *, keys: Keys, lease: Lease) -> None:
    """The job is finished (its final event published): forget it."""
    redis.eval(_RELEASE, 2, keys.student_running, keys.job_lease(lease.job_id), lease.job_id, lease.owner)


async def record_dispatched(
    redis: AsyncRedis, *, keys: Keys, payloads: Sequence[tuple[str, Orphan]], at: float
) -> list[str | None]:
    """Remember jobs about to be sent to the students (job id, task arguments) until one claims each; in
    the same round trip, read which live student prepared each job: its own queue, or None."""
    if not payloads:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        prepared = [keys.prepared(job_id) for job_id, _ in payloads]
        pipe.eval(_ROUTES, len(prepared), *prepared, keys.queue_alive(""))
        pipe.hset(keys.student_dispatched, mapping={job_id: _body(p) for job_id, p in payloads})
        pipe.zadd(keys.student_dispatched_at, {job_id: at for job_id, _ in payloads})
        prepared, *_ = await pipe.execute()
    return [q.decode() if isinstance(q, bytes) else q for q in prepared]


def sweep(
    redis: Redis, *, keys: Keys, queue: str, now: float, redelivery_s: float, ttl_s: float
) -> list[Orphan]:
    """Take the jobs to send again (see the module's docstring); each is returned to exactly one caller."""
    script_keys = [keys.student_running, keys.student_dispatched, keys.student_dispatched_at, queue]
    taken: Any = redis.eval(
        _SWEEP,
        len(script_keys),
        *script_keys,
        keys.job_lease(""),
        keys.final(""),
        now - redelivery_s,
        now - ttl_s,
        keys.prepared(""),
        keys.queue_alive(""),
        keys.queue_list(""),
    )
    orphans = []
    for body in taken:
        payload = json.loads(body)
        orphans.append(Orphan(job_json=payload["job"], guidance_json=payload["guidance"]))
    return orphans


def running(redis: Redis, *, keys: Keys) -> int:
    """Jobs some student is running now (or ran until it died, not yet swept)."""
    return int(redis.hlen(keys.student_running))


def _body(payload: Orphan) -> str:
    return json.dumps({"job": payload.job_json, "guidance": payload.guidance_json})
