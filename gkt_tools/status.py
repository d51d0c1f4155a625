"""`gkt status`: which workers are alive and how deep the queues are, read from the stack's Redis."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from redis import Redis
from redis.exceptions import RedisError, ResponseError

from gkt.config import CommonSettings
from gkt.connections import connect
from gkt.keys import TEACHER_GROUP, Keys
from gkt.liveness import HEARTBEAT_TTL_S, parse_heartbeat
from gkt_tools.stack import read_detached

# Kombu's Redis transport keeps a queue's tasks in one list per priority step, and every task delivered to a
# worker but not yet acknowledged (a running job: students acknowledge late) in one hash.
_CELERY_PRIORITY_SEPARATOR = "\x06\x16"
_CELERY_PRIORITY_STEPS = (0, 3, 6, 9)
_CELERY_UNACKED = "unacked"


@dataclass(frozen=True)
class Teacher:
    name: str
    beat_age_s: float
    batch_s: float | None
    """Seconds per batch, or per job when pipelined (a moving average); None until its first."""
    max_batch_size: int | None


@dataclass(frozen=True)
class Student:
    name: str
    beat_age_s: float
    busy: int | None
    """Jobs it is running now; None for a student that does not say."""
    capacity: int | None


@dataclass(frozen=True)
class Status:
    """One look at a stack: its workers and its queues."""

    teachers: list[Teacher] = field(default_factory=list)
    students: list[Student] = field(default_factory=list)
    queued_jobs: int = 0
    """Jobs in the query stream: not yet taken by a teacher, or held by one now."""
    jobs_in_teacher_batches: int = 0
    oldest_job_age_s: float | None = None
    student_tasks_waiting: int = 0
    student_tasks_running: int = 0
    dead_letters: int = 0

    @property
    def healthy(self) -> bool:
        return bool(self.teachers) and bool(self.students)

    def problems(self) -> list[str]:
        return [
            f"no {role} is alive"
            for role, alive in (("teacher", self.teachers), ("student", self.students))
            if not alive
        ]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "healthy": self.healthy}


def run(*, as_json: bool, state_dir: Path) -> int:
    """`gkt status`: 0 when a teacher and a student are alive, 1 when not, 2 when Redis cannot be read."""
    local = read_detached(state_dir) or {}
    try:
        # GKT_REDIS_URL names the stack; without it, the private Redis of the stack `gkt up` started here.
        settings = CommonSettings()
        if "redis_url" not in settings.model_fields_set and local.get("redis"):
            settings = CommonSettings(redis_url=local["redis"])
    except (ValidationError, OSError) as exc:
        print(f"error: the Redis settings cannot be used: {_first_line(exc)}", file=sys.stderr)
        return 2
    where = str(json.loads(settings.describe())["redis_url"])  # its password masked
    try:
        status = read_status(connect(settings.redis_url), keys=Keys(settings.key_prefix))
    except RedisError as exc:
        print(
            f"error: cannot read the stack's state from Redis at {where} ({_first_line(exc)}): is the stack "
            "up? `make up`, or set GKT_REDIS_URL",
            file=sys.stderr,
        )
        return 2
    print(format_json(status, where=where) if as_json else format_status(status, where=where))
    return 0 if status.healthy else 1


def read_status(redis: Redis, *, keys: Keys, now: float | None = None) -> Status:
    """Everything `gkt status` shows, from a handful of Redis reads."""
    now = time.time() if now is None else now
    paces = {_text(k): _text(v).split() for k, v in redis.hgetall(keys.teacher_pace).items()}
    teachers = []
    for name, (at, _, _) in _beats(redis, keys=keys, role="teacher", now=now):
        batch_s, max_batch, _ = paces.get(name, (None, None, None))
        teachers.append(
            Teacher(
                name=name,
                beat_age_s=round(now - at, 1),
                batch_s=float(batch_s) if batch_s else None,
                max_batch_size=int(max_batch) if max_batch else None,
            )
        )
    students = [
        Student(name=name, beat_age_s=round(now - at, 1), busy=busy, capacity=capacity)
        for name, (at, busy, capacity) in _beats(redis, keys=keys, role="student", now=now)
    ]
    oldest: Any = redis.xrange(keys.queries, count=1)
    celery_lists = [keys.student_queue] + [
        f"{keys.student_queue}{_CELERY_PRIORITY_SEPARATOR}{s}" for s in _CELERY_PRIORITY_STEPS[1:]
    ]
    return Status(
        teachers=teachers,
        students=students,
        queued_jobs=int(redis.xlen(keys.queries)),
        jobs_in_teacher_batches=_pending(redis, keys=keys),
        oldest_job_age_s=round(now - int(_text(oldest[0][0]).split("-")[0]) / 1000, 1) if oldest else None,
        student_tasks_waiting=sum(int(redis.llen(name)) for name in celery_lists),
        student_tasks_running=int(redis.hlen(_CELERY_UNACKED)),
        dead_letters=int(redis.xlen(keys.dead_letters)),
    )


def format_status(status: Status, *, where: str) -> str:
    lines = [f"stack at {where}"]
    lines.append(f"teachers       {len(status.teachers)} alive")
    for t in status.teachers:
        pace = (
            f"{t.batch_s:.2f} s per batch or job, {t.max_batch_size} at once" if t.batch_s else "no job yet"
        )
        lines.append(f"  {t.name:<28} beat {t.beat_age_s:.0f} s ago   {pace}")
    busy = sum(s.busy or 0 for s in status.students)
    capacity = sum(s.capacity or 0 for s in status.students)
    lines.append(f"students       {len(status.students)} alive, {busy} of {capacity} job slots busy")
    for s in status.students:
        load = f"busy {s.busy}/{s.capacity}" if s.capacity is not None else ""
        lines.append(f"  {s.name:<28} beat {s.beat_age_s:.0f} s ago   {load}".rstrip())
    oldest = f", oldest {status.oldest_job_age_s:.1f} s old" if status.oldest_job_age_s is not None else ""
    lines.append(
        f"query queue    {_jobs(status.queued_jobs)} ({status.jobs_in_teacher_batches} held by a teacher){oldest}"
    )
    lines.append(
        f"student queue  {status.student_tasks_waiting} waiting, {status.student_tasks_running} delivered to "
        "students and not yet done"
    )
    lines.append(f"dead letters   {status.dead_letters}")
    lines.extend(f"problem: {problem}" for problem in status.problems())
    return "\n".join(lines)


def format_json(status: Status, *, where: str) -> str:
    return json.dumps({"redis": where, **status.as_dict()}, indent=2)


def _beats(
    redis: Redis, *, keys: Keys, role: str, now: float
) -> list[tuple[str, tuple[float, int | None, int | None]]]:
    """(name, parsed heartbeat) of every worker of `role` whose heartbeat is fresh, sorted by name."""
    prefix = keys.heartbeat(role, "")
    names = sorted(_text(k) for k in redis.scan_iter(match=prefix + "*", count=1000))
    values = redis.mget(names) if names else []
    beats = []
    for key, value in zip(names, values, strict=True):
        if value is None:  # expired between the scan and the read
            continue
        beat = parse_heartbeat(value)
        if now - beat[0] <= HEARTBEAT_TTL_S:
            beats.append((key.removeprefix(prefix), beat))
    return beats


def _pending(redis: Redis, *, keys: Keys) -> int:
    try:
        summary: Any = redis.xpending(keys.queries, TEACHER_GROUP)
    except ResponseError as exc:  # no stream or no group yet: nothing is pending
        if "NOGROUP" in str(exc):
            return 0
        raise
    return int(summary["pending"])


def _jobs(count: int) -> str:
    return f"{count} job" if count == 1 else f"{count} jobs"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
