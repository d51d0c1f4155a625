"""The Redis layout: the name of every key under one prefix, the teachers' consumer group, and the Celery
queue and task of the students.

Every key a job creates expires after the job TTL; the query stream holds only jobs not yet acknowledged by
a teacher (acknowledged entries are deleted), so nothing grows without bound.
"""

from __future__ import annotations

from dataclasses import dataclass

TEACHER_GROUP = "teachers"
STUDENT_QUEUE = "student"
STUDENT_TASK = "gkt.student.complete"
STUDENT_PREPARE_TASK = "gkt.student.prepare"
"""Prefill a job's question on a student while the teacher writes its guidance (shared queue)."""


def own_queue(node: str) -> str:
    """The Celery queue only the student worker `node` consumes (beside the shared one): the queue of the
    jobs whose question it prepared."""
    return f"{STUDENT_QUEUE}.{node}"


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
        (`gkt.connections.celery_broker`), so the queue named STUDENT_QUEUE is this list."""
        return self.queue_list(STUDENT_QUEUE)

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:deadletter"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def final(self, job_id: str) -> str:
        return f"{self.prefix}:final:{job_id}"

    def prepared(self, job_id: str) -> str:
        """The own queue of the student that prepared the job's question (short-lived)."""
        return f"{self.prefix}:prepared:{job_id}"

    def queue_list(self, queue: str) -> str:
        """The Redis list of the Celery queue `queue` (kombu puts `{prefix}:` before every key it makes)."""
        return f"{self.prefix}:{queue}"

    def queue_alive(self, queue: str) -> str:
        """Present while the student that consumes its own queue `queue` is alive (renewed with its leases)."""
        return f"{self.prefix}:alive:{queue}"

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
