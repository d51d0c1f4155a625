"""Job leases: which student runs which job, renewed while it runs, so a dead student's jobs are taken over.

A student claims a job before generating it: the claim fails when the job is answered already or
another student holds its lease. While the job runs, its student renews the lease every few seconds;
the job's payload sits in the `running` hash until the student releases it. A student that dies
stops renewing: once its lease expires, any other student's sweeper takes the payload (atomically, so
exactly one does) and sends the job again. A student that missed renewals long enough for its lease
to be taken learns so at its next renewal and drops the job without publishing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from redis import Redis

from gkt.queue import Keys

# KEYS: final, lease, attempts, running. ARGV: owner, lease ms, payload, job id, ttl s.
_CLAIM = """
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

# KEYS: running. ARGV: the lease key prefix (job id appended). Takes every orphaned payload.
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
return taken
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
    body = json.dumps({"job": payload.job_json, "guidance": payload.guidance_json})
    script_keys = [keys.final(job_id), keys.job_lease(job_id), keys.attempts(job_id), keys.student_running]
    status, attempt = redis.eval(_CLAIM, 4, *script_keys, owner, int(lease_s * 1000), body, job_id, ttl_s)
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


def sweep(redis: Redis, *, keys: Keys) -> list[Orphan]:
    """Take the payloads of running jobs whose lease expired; each is returned to exactly one caller."""
    taken: Any = redis.eval(_SWEEP, 1, keys.student_running, keys.job_lease(""))
    orphans = []
    for body in taken:
        payload = json.loads(body)
        orphans.append(Orphan(job_json=payload["job"], guidance_json=payload["guidance"]))
    return orphans


def running(redis: Redis, *, keys: Keys) -> int:
    """Jobs some student is running now (or ran until it died, not yet swept)."""
    return int(redis.hlen(keys.student_running))
