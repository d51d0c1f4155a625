"""Workers say they are alive from a timer, not from jobs: idle or mid-batch, their heartbeat stays fresh."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gkt.jobs import GuidanceSpec, Job
from gkt.keys import Keys
from gkt.liveness import parse_heartbeat
from gkt.queue import enqueue_job, ensure_group
from services.student.heartbeat import Heartbeat
from services.teacher.backends.base import BackendError, GenerationRequest, GenerationResult
from services.teacher.settings import TeacherSettings
from services.teacher.worker import TeacherWorker

KEYS = Keys("beat")


def _poll(condition: Callable[[], object], *, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {timeout_s} s: {condition}")
        time.sleep(0.02)


def test_a_student_heartbeat_is_rewritten_while_idle_and_says_how_busy_it_is(redis: Redis) -> None:
    key = KEYS.heartbeat("student", "host-1")
    heartbeat = Heartbeat(redis=redis, key=key, every_s=0.05)
    heartbeat.start()
    try:
        at, busy, capacity = parse_heartbeat(redis.get(key) or b"")
        assert (busy, capacity) == (0, 1) and abs(at - time.time()) < 60
        redis.delete(key)  # as if it had expired: no job runs, yet it comes back
        _poll(lambda: redis.exists(key))
        heartbeat.job_started()
        _poll(lambda: parse_heartbeat(redis.get(key) or b"0")[1] == 1)
        heartbeat.job_finished()
        _poll(lambda: parse_heartbeat(redis.get(key) or b"0")[1] == 0)
        assert 0 < (redis.ttl(key) or 0) <= 60
    finally:
        heartbeat.stop()
    assert not redis.exists(key)  # a stopped student leaves at once


class _StuckBackend:
    """A teacher backend whose generation never ends until released: longer than a heartbeat's life."""

    name = "stuck"
    concurrency = 4

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def start(self) -> None: ...

    def check_limits(self, *, max_guidance_tokens: int) -> None: ...

    async def generate_batch(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | BackendError]:
        self.entered.set()
        await self.release.wait()
        return [GenerationResult(text="g", token_count=1, finish_reason="length") for _ in requests]

    async def generate(self, request: GenerationRequest) -> GenerationResult | BackendError:
        return (await self.generate_batch([request]))[0]

    async def close(self) -> None: ...


async def test_a_teacher_heartbeat_is_rewritten_during_a_long_batch(redis_url: str, redis: Redis) -> None:
    aredis = AsyncRedis.from_url(redis_url)
    await ensure_group(aredis, keys=KEYS)
    backend = _StuckBackend()
    # renewed every third of its lifetime: every 0.33 s here
    settings = TeacherSettings(key_prefix=KEYS.prefix, teacher_name="t1", teacher_heartbeat_ttl_s=1.0)
    worker = TeacherWorker(settings=settings, redis=aredis, backend=backend, dispatch=lambda job, g, q: None)
    key = KEYS.heartbeat("teacher", "t1")
    running = asyncio.create_task(worker.run())
    try:
        await enqueue_job(aredis, keys=KEYS, job=Job(query="q", guidance=GuidanceSpec(max_guidance_tokens=1)))
        await asyncio.wait_for(backend.entered.wait(), timeout=20)
        await aredis.delete(key)  # as if it had expired mid-batch
        deadline = time.monotonic() + 20
        while not await aredis.exists(key):
            assert time.monotonic() < deadline, "no heartbeat while the batch ran"
            await asyncio.sleep(0.02)
        assert not backend.release.is_set()  # still inside the batch
    finally:
        backend.release.set()
        worker.stop()
        await asyncio.wait_for(running, timeout=20)
        await aredis.aclose()
    assert not redis.exists(key)  # a stopped teacher leaves at once
