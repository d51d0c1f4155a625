"""The jobs one student process holds: their leases, renewed by the process's timer, and lost ones."""

from __future__ import annotations

import threading

from redis import Redis

from gkt import leases
from gkt.jobs import Guidance, Job
from gkt.keys import Keys
from gkt.leases import Claim, Lease, Orphan


class LeaseLost(Exception):
    """The job's lease expired and another student took the job over: drop it without publishing."""


class JobBook:
    """Thread-safe: task threads claim and release jobs, the timer renews their leases."""

    def __init__(self, redis: Redis, *, keys: Keys, owner: str, lease_s: float, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.owner = owner
        self.lease_s = lease_s
        self.ttl_s = ttl_s
        self._held: dict[str, Lease] = {}
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._claims = 0

    def claim(self, job: Job, guidance: Guidance) -> tuple[Claim, Lease | None]:
        with self._lock:
            self._claims += 1
            owner = f"{self.owner}:{self._claims}"
        payload = Orphan(job_json=job.model_dump_json(), guidance_json=guidance.model_dump_json())
        claim, lease = leases.claim(
            self.redis,
            keys=self.keys,
            job_id=job.id,
            owner=owner,
            payload=payload,
            lease_s=self.lease_s,
            ttl_s=self.ttl_s,
        )
        if lease is not None:
            with self._lock:
                self._held[job.id] = lease
                self._lost.discard(job.id)
        return claim, lease

    def release(self, lease: Lease) -> None:
        with self._lock:
            self._held.pop(lease.job_id, None)
            lost = lease.job_id in self._lost
            self._lost.discard(lease.job_id)
        if not lost:
            leases.release(self.redis, keys=self.keys, lease=lease)

    def abandon(self, lease: Lease) -> None:
        """Stop renewing a job's lease without releasing it: once it expires, a student takes the job over
        (its outcome could not be published here)."""
        with self._lock:
            self._held.pop(lease.job_id, None)
            self._lost.discard(lease.job_id)

    def lost(self, job_id: str) -> bool:
        return job_id in self._lost

    @property
    def held(self) -> int:
        return len(self._held)

    def renew(self) -> list[Lease]:
        """Extend the leases of every held job; mark (and return) those another student took over."""
        with self._lock:
            held = list(self._held.values())
        lost = leases.renew(self.redis, keys=self.keys, leases=held, lease_s=self.lease_s)
        with self._lock:
            self._lost.update(lease.job_id for lease in lost)
        return lost
