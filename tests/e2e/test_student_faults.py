"""No student job is lost, with the bundled models: a killed worker process, a killed worker, Redis
restarting during jobs; and an idle student stays visible. Each scenario sends JOBS jobs and counts
answered, lost (no reply before the deadline) and duplicated (more than one final event)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis import Redis

from gkt.jobs import ErrorEvent, FinalEvent
from gkt.keys import Keys
from gkt.liveness import parse_heartbeat
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from gkt_tools.stack import Stack
from tests.e2e.conftest import TINY_STACK_ENV
from tests.events import job_events

pytestmark = pytest.mark.real_models

JOBS = 8
RECOVERY_S = 30.0
KEYS = Keys("sfaults")


class AofRedis:
    """A redis-server with an append-only file (fsync every second) that a test can restart."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port = workdir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: run `make setup`"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _until(lambda: Redis.from_url(self.url).ping(), timeout_s=30, what="redis to answer")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # a clean shutdown: the append-only file is flushed
            self.process.wait(timeout=30)
            self.process = None


@pytest.fixture(scope="module")
def redis_aof(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AofRedis]:
    server = AofRedis(tmp_path_factory.mktemp("redis-aof"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(redis_aof: AofRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The bundled teacher and two bundled students, each worker under its restarting parent."""
    stack = Stack(
        state_dir=tmp_path_factory.mktemp("student-faults"),
        env={**TINY_STACK_ENV, "GKT_KEY_PREFIX": KEYS.prefix, "GKT_STUDENT_WARMUP": "true"},
        redis_url=redis_aof.url,
        students=2,
        gateway_addr=f"127.0.0.1:{free_port()}",
    )
    stack.start(timeout_s=900)  # a fresh machine converts both GGUF files first
    yield stack
    stack.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[tuple[guidance_pb2_grpc.GuidanceServiceStub, Redis]]:
    redis = Redis.from_url(stack.redis_url or "")
    with grpc.insecure_channel(stack.gateway_addr or "") as channel:
        yield guidance_pb2_grpc.GuidanceServiceStub(channel), redis
    redis.close()


def _request(index: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        query=f"Tom has {index + 3} boxes with 4 apples in each box. How many apples does Tom have?",
        task=pb.TASK_FREEFORM,
        guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=4),
        sampling=pb.SamplingParams(temperature=0.8, max_new_tokens=48, seed=index + 1),
    )


def _until(check: Callable[[], object], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.01)


class Outcomes:
    """Replies of JOBS concurrent calls, with the time each arrived."""

    def __init__(self, stub: guidance_pb2_grpc.GuidanceServiceStub, *, timeout_s: float = 300) -> None:
        self.futures: list[Future[Any]] = []
        self.done_at: dict[int, float] = {}
        for i in range(JOBS):
            future = stub.Generate.future(_request(i), timeout=timeout_s)
            future.add_done_callback(lambda _f, i=i: self.done_at.__setitem__(i, time.monotonic()))
            self.futures.append(future)

    def wait(self) -> tuple[list[pb.GenerateResponse], list[grpc.StatusCode]]:
        replies, failures = [], []
        for future in self.futures:
            try:
                replies.append(future.result())
            except grpc.RpcError as exc:
                failures.append(exc.code())
        return replies, failures


def _finals(redis: Redis, job_id: str) -> list[FinalEvent | ErrorEvent]:
    return [e for _, e in job_events(redis, KEYS, job_id) if isinstance(e, FinalEvent | ErrorEvent)]


def _worker_pid(stack: Stack, name: str) -> int:
    """The Celery worker under a student's restarting parent (where the model and the jobs live)."""
    parent = stack.processes[name].pid
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return int(children[0])


def _running_on(redis: Redis, pid: int) -> int:
    """Jobs whose lease a worker process holds now."""
    owner = f"{socket.gethostname()}-{pid}:"
    holders: list[Any] = [redis.get(key) for key in redis.scan_iter(match=KEYS.job_lease("*"))]
    return sum(1 for holder in holders if holder and bytes(holder).decode().startswith(owner))


def _assert_each_answered_once(redis: Redis, replies: list[pb.GenerateResponse], failures: list[Any]) -> None:
    assert failures == [], failures  # lost = 0, failed = 0
    assert len({r.job_id for r in replies}) == JOBS
    for reply in replies:
        finals = _finals(redis, reply.job_id)
        assert len(finals) == 1 and isinstance(finals[0], FinalEvent), finals  # duplicated = 0


def test_a_killed_worker_process_loses_nothing_and_its_student_serves_again(
    stack: Stack, client: tuple[guidance_pb2_grpc.GuidanceServiceStub, Redis]
) -> None:
    stub, redis = client
    victim = _worker_pid(stack, "student-0")
    outcomes = Outcomes(stub)
    _until(lambda: _running_on(redis, victim) > 0, timeout_s=240, what="a job to run on student-0")
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    replies, failures = outcomes.wait()

    _assert_each_answered_once(redis, replies, failures)
    assert max(outcomes.done_at.values()) - killed_at <= RECOVERY_S
    assert any(r.usage.completion_tokens > 0 for r in replies)
    # the parent started a new worker, which loaded the model and says it is alive: no restart by hand
    _until(lambda: _worker_pid(stack, "student-0") != victim, timeout_s=30, what="a new worker process")
    fresh = _worker_pid(stack, "student-0")
    _until(
        lambda: redis.exists(KEYS.heartbeat("student", f"{socket.gethostname()}-{fresh}")),
        timeout_s=120,
        what="the new worker's heartbeat",
    )


def test_a_killed_worker_loses_nothing_another_student_takes_its_jobs_over(
    stack: Stack, client: tuple[guidance_pb2_grpc.GuidanceServiceStub, Redis]
) -> None:
    stub, redis = client
    victim = _worker_pid(stack, "student-1")
    outcomes = Outcomes(stub)
    _until(lambda: _running_on(redis, victim) > 0, timeout_s=240, what="a job to run on student-1")
    stack.kill("student-1")  # the parent and the worker: nobody restarts it
    killed_at = time.monotonic()
    try:
        replies, failures = outcomes.wait()
        _assert_each_answered_once(redis, replies, failures)
        assert max(outcomes.done_at.values()) - killed_at <= RECOVERY_S
        assert "sending it again" in stack.log("student-0")
    finally:
        stack.restart("student-1")


def test_jobs_running_while_redis_restarts_are_answered_or_unavailable_never_silent(
    stack: Stack, redis_aof: AofRedis, client: tuple[guidance_pb2_grpc.GuidanceServiceStub, Redis]
) -> None:
    stub, redis = client
    outcomes = Outcomes(stub, timeout_s=240)
    _until(lambda: redis.hlen(KEYS.student_running) > 0, timeout_s=240, what="a student job to run")
    redis_aof.stop()
    time.sleep(2)  # Redis is away for a moment, as in a restart
    redis_aof.start()
    replies, failures = outcomes.wait()

    assert len(replies) + len(failures) == JOBS
    assert set(failures) <= {grpc.StatusCode.UNAVAILABLE}, failures  # never DEADLINE_EXCEEDED: silence
    for reply in replies:
        assert len(_finals(redis, reply.job_id)) == 1
    # the students finished the jobs they held and published them once Redis was back
    _until(lambda: redis.hlen(KEYS.student_running) == 0, timeout_s=120, what="the students' jobs to end")


def test_an_idle_student_keeps_its_heartbeat_fresh(stack: Stack) -> None:
    redis = Redis.from_url(stack.redis_url or "")
    beats = [
        KEYS.heartbeat("student", f"{socket.gethostname()}-{_worker_pid(stack, n)}") for n in ("student-0",)
    ]

    def at(key: str) -> float:
        value = redis.get(key)
        return parse_heartbeat(value)[0] if value else 0.0

    # a worker started again by its parent (after the faults above) says it is alive once it is ready
    _until(lambda: all(at(key) for key in beats), timeout_s=180, what="the student's heartbeat")
    first = [at(key) for key in beats]
    _until(
        lambda: all(at(k) > f for k, f in zip(beats, first, strict=True)),
        timeout_s=20,
        what="an idle student's next heartbeat",
    )
