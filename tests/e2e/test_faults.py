"""Fault injection with real processes: a teacher killed mid-batch, a student killed mid-job, a job that
keeps killing its students, Redis restarting, a client that cancels. Each test counts what was submitted
against what was answered: nothing lost, nothing answered twice.

Every test but the last runs its own stack (private redis-server, teacher, Celery worker, gateway) on the
tiny models, because it kills parts of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from redis import Redis

from gkt.jobs import DeltaEvent, ErrorEvent, FinalEvent
from gkt.keys import TEACHER_GROUP, Keys
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools import faults, load
from gkt_tools.processes import free_port
from gkt_tools.stack import Stack
from tests.e2e.conftest import TINY_STACK_ENV
from tests.events import job_events
from tests.waiting import until

TIMEOUT = 120
HEARTBEAT_TTL_S = 3
KEYS = Keys("faults")
# Long enough that a killed job is mid-generation when the test sees it start; greedy, so the same
# request always generates the same tokens.
LONG = pb.SamplingParams(temperature=0, max_new_tokens=300)


@contextlib.contextmanager
def _stack(
    tiny_models: tuple[Path, Path], tmp_path: Path, *, teachers: int = 1, **env: str
) -> Iterator[Stack]:
    teacher, student = tiny_models
    stack = Stack(
        state_dir=tmp_path / "stack",
        env={**TINY_STACK_ENV, "GKT_TEACHER_MODEL": str(teacher), "GKT_STUDENT_MODEL": str(student),
             "GKT_KEY_PREFIX": KEYS.prefix, "GKT_TEACHER_CLAIM_IDLE_MS": "1000", **env},
        gateway_addr=f"127.0.0.1:{free_port()}",
        teachers=teachers,
    )  # fmt: skip
    stack.start(timeout_s=180)
    try:
        yield stack
    finally:
        stack.stop()


@contextlib.contextmanager
def _client(stack: Stack) -> Iterator[tuple[guidance_pb2_grpc.GuidanceServiceStub, Redis]]:
    redis = Redis.from_url(stack.redis_url or "")
    with grpc.insecure_channel(stack.gateway_addr or "") as channel:
        yield guidance_pb2_grpc.GuidanceServiceStub(channel), redis
    redis.close()


TAKEOVER_MESSAGES = ("took over a dead teacher's jobs", "took over jobs left unacknowledged too long")


def _jobs_taken_over(log: str) -> int:
    """The jobs a teacher's log says it took over from another, by either way of taking over."""
    return sum(jobs for _at, jobs in _takeovers(log))


def _takeovers(log: str) -> list[tuple[float, int]]:
    """Each takeover a teacher's log records: when (epoch seconds) and how many jobs."""
    taken = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("msg") in TAKEOVER_MESSAGES:
            taken.append((float(entry["ts"]), int(entry["jobs"])))
    return taken


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _request(query: str, sampling: pb.SamplingParams = LONG) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        query=query,
        task=pb.TASK_GSM8K,
        guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=6),
        sampling=sampling,
    )


def _assert_each_answered_once(redis: Redis, replies: list[pb.GenerateResponse], submitted: int) -> None:
    assert len({r.job_id for r in replies}) == submitted  # lost = 0
    for reply in replies:
        finals = load.finals(redis, keys=KEYS, job_id=reply.job_id)
        assert len(finals) == 1 and isinstance(finals[0], FinalEvent), finals  # duplicated = 0


class _StudentKiller(threading.Thread):
    """SIGKILLs the worker's pool process whenever a job starts an attempt in `kill_attempts`, before it
    has finished: a student dying mid-job, as often as asked."""

    def __init__(self, stack: Stack, redis: Redis, kill_attempts: set[int]) -> None:
        super().__init__(daemon=True)
        self.stack, self.redis, self.kill_attempts = stack, redis, kill_attempts
        self.killed: list[tuple[str, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for key in self.redis.scan_iter(match=KEYS.attempts("*")):
                job_id = key.decode().rsplit(":", 1)[-1]
                attempt = int(self.redis.get(key) or 0)
                hit = (job_id, attempt)
                if attempt in self.kill_attempts and hit not in self.killed and not self._finished(job_id):
                    child = faults.worker_pid(self.stack, "student-0")
                    if child is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(child, signal.SIGKILL)
                        self.killed.append(hit)
            time.sleep(0.002)

    def _finished(self, job_id: str) -> bool:
        return bool(self.redis.exists(KEYS.final(job_id)))


def test_jobs_of_a_teacher_killed_mid_batch_are_reclaimed_and_answered_once(
    tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    # A long batching window: the teacher holds the jobs (read, unacknowledged) when it is killed.
    with (
        _stack(tiny_models, tmp_path, GKT_TEACHER_MAX_WAIT_MS="5000") as stack,
        _client(stack) as (stub, redis),
    ):
        sampling = pb.SamplingParams(temperature=0, max_new_tokens=8)
        futures: list[Future[pb.GenerateResponse]] = [
            stub.Generate.future(_request(f"Question {i}?", sampling), timeout=TIMEOUT) for i in range(4)
        ]
        until(
            lambda: redis.xpending(KEYS.queries, TEACHER_GROUP)["pending"] == 4,
            what="the teacher to read 4 jobs",
            timeout_s=60,
            every_s=0.005,
        )
        stack.kill("teacher")
        stack.restart("teacher")  # a new consumer: it claims the dead one's jobs after 1 s idle

        replies = [f.result() for f in futures]

        _assert_each_answered_once(redis, replies, submitted=4)
        assert redis.xpending(KEYS.queries, TEACHER_GROUP)["pending"] == 0
        # the killed teacher only read its jobs; the restarted one took all four over (the log is shared)
        assert _jobs_taken_over(stack.log("teacher")) == 4


def test_a_teacher_killed_holding_a_batch_is_taken_over_when_its_heartbeat_expires_and_leaves_the_group(
    tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    # Two teachers; the claim idle time is far beyond the calls' deadline: only the heartbeat can explain a
    # takeover, and the surviving teacher, already loaded, shows how soon after the heartbeat expired.
    with (
        _stack(
            tiny_models,
            tmp_path,
            teachers=2,
            GKT_TEACHER_MAX_WAIT_MS="5000",
            GKT_TEACHER_CLAIM_IDLE_MS="600000",
            GKT_TEACHER_HEARTBEAT_TTL_S=str(HEARTBEAT_TTL_S),
        ) as stack,
        _client(stack) as (stub, redis),
    ):
        sampling = pb.SamplingParams(temperature=0, max_new_tokens=8)
        futures: list[Future[pb.GenerateResponse]] = [
            stub.Generate.future(_request(f"Question {i}?", sampling), timeout=60) for i in range(4)
        ]
        until(
            lambda: redis.xpending(KEYS.queries, TEACHER_GROUP)["pending"] == 4,
            what="the teachers to read 4 jobs",
            timeout_s=60,
            every_s=0.005,
        )
        victim = faults.teacher_holding_a_batch(stack, redis, keys=KEYS)
        assert victim is not None
        holder = f"{socket.gethostname()}-{stack.processes[victim].pid}"
        held = {
            _text(c["name"]): int(c["pending"]) for c in redis.xinfo_consumers(KEYS.queries, TEACHER_GROUP)
        }
        killed_at = time.time()
        stack.kill(victim)

        replies = [f.result() for f in futures]

        _assert_each_answered_once(redis, replies, submitted=4)
        (survivor,) = [name for name in faults.teacher_names(stack) if name != victim]
        taken = _takeovers(stack.log(survivor))
        assert sum(jobs for _at, jobs in taken) == held[holder]  # every job the dead teacher held
        # claimed within 10 s of the heartbeat expiring (at most its lifetime after the kill)
        assert taken[0][0] - killed_at <= HEARTBEAT_TTL_S + 10, taken
        until(
            lambda: (
                holder not in [_text(c["name"]) for c in redis.xinfo_consumers(KEYS.queries, TEACHER_GROUP)]
            ),
            timeout_s=30,
            what="the dead teacher to leave the group",
        )


def test_a_student_killed_mid_job_is_redelivered_and_answered_once(
    tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    with _stack(tiny_models, tmp_path) as stack, _client(stack) as (stub, redis):
        killer = _StudentKiller(stack, redis, kill_attempts={1})
        killer.start()
        futures = [stub.Generate.future(_request(f"Long question {i}?"), timeout=TIMEOUT) for i in range(3)]
        replies = [f.result() for f in futures]
        killer.done.set()
        killer.join()

        _assert_each_answered_once(redis, replies, submitted=3)
        assert killer.killed, "no job was caught mid-generation"
        for job_id, _attempt in killer.killed:
            # Died at least once and answered by a later delivery: a worker decodes several jobs at once,
            # so a kill aimed at one job's first attempt can also catch another's second.
            assert int(redis.get(KEYS.attempts(job_id)) or 0) >= 2


def test_a_job_that_keeps_killing_its_students_is_dead_lettered_with_an_error(
    tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    with (
        _stack(tiny_models, tmp_path, GKT_STUDENT_MAX_ATTEMPTS="2") as stack,
        _client(stack) as (stub, redis),
    ):
        killer = _StudentKiller(stack, redis, kill_attempts={1, 2})
        killer.start()
        with pytest.raises(grpc.RpcError) as failure:
            stub.Generate(_request("Poison?"), timeout=TIMEOUT)
        killer.done.set()
        killer.join()

        assert failure.value.code() == grpc.StatusCode.INTERNAL
        assert "dead-lettered" in (failure.value.details() or "")
        assert [attempt for _, attempt in killer.killed] == [1, 2]
        job_id = killer.killed[0][0]
        finals = load.finals(redis, keys=KEYS, job_id=job_id)
        assert len(finals) == 1 and isinstance(finals[0], ErrorEvent)
        dead: Any = redis.xrange(KEYS.dead_letters)
        assert len(dead) == 1 and job_id.encode() in dead[0][1][b"job"]
        # the worker is still serving
        assert stub.Generate(_request("Fine?", pb.SamplingParams(max_new_tokens=4)), timeout=TIMEOUT).job_id


def test_while_redis_is_down_the_gateway_answers_unavailable_and_serves_again_when_it_is_back(
    tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    short = pb.SamplingParams(temperature=0, max_new_tokens=4)
    with _stack(tiny_models, tmp_path) as stack, _client(stack) as (stub, _redis):
        assert stub.Generate(_request("Before?", short), timeout=TIMEOUT).job_id

        stack.kill("redis")
        with pytest.raises(grpc.RpcError) as down:
            stub.Generate(_request("During?", short), timeout=30)
        # UNAVAILABLE well before the 30 s deadline, not a hang into DEADLINE_EXCEEDED
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE, down.value.details()

        stack.restart("redis")  # same port, empty (no persistence): the services reconnect by themselves
        answered: list[pb.GenerateResponse] = []

        def serves() -> bool:
            with contextlib.suppress(grpc.RpcError):
                answered.append(stub.Generate(_request("After?", short), timeout=15))
            return bool(answered)

        until(serves, timeout_s=120, what="the stack to serve again after redis came back")
        assert {"teacher", "student-0", "gateway"} <= set(stack.processes)
        assert all(stack.processes[n].poll() is None for n in ("teacher", "student-0", "gateway"))


def test_a_client_that_cancels_stops_its_students_generation_within_one_step(tiny_stack: Stack) -> None:
    redis = Redis.from_url(tiny_stack.redis_url or "")
    keys = Keys("e2e")
    started = time.time()
    with grpc.insecure_channel(tiny_stack.gateway_addr or "") as channel:
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
        call = stub.GenerateStream(_request("Cancel me?", pb.SamplingParams(temperature=0, max_new_tokens=1000)),
                                   timeout=TIMEOUT)  # fmt: skip
        kinds = []
        for event in call:
            kinds.append(event.WhichOneof("event"))
            if kinds.count("delta") == 3:
                call.cancel()
                break
    assert kinds[0] == "guidance" and "final" not in kinds

    # the cancel mark of this job: the only one set since the call started (its value is when)
    def marks() -> list[str]:
        found = (k.decode() for k in redis.scan_iter(match=keys.cancelled("*")))
        return [k for k in found if float(cast(bytes, redis.get(k) or 0)) >= started]

    until(marks, timeout_s=60, what="the gateway to mark the job cancelled")
    cancelled = marks()
    assert len(cancelled) == 1
    job_id = cancelled[0].rsplit(":", 1)[-1]
    cancelled_ms = int(float(cast(bytes, redis.get(cancelled[0]))) * 1000)
    until(lambda: redis.exists(keys.final(job_id)), timeout_s=60, what="the student to stop")
    entries = job_events(redis, keys, job_id)
    final = entries[-1][1]
    assert isinstance(final, ErrorEvent) and final.code == "CANCELLED"
    after = [e for ms, e in entries if ms > cancelled_ms and isinstance(e, DeltaEvent)]
    assert len(after) <= 1, f"{len(after)} tokens generated after the cancel"
    redis.close()
