"""The pipelined teacher against a real Redis: jobs admitted as earlier ones end, each published and then
acknowledged on its own, failures, reclaims and dead letters per job.

The remote backends talk HTTP to `FakeInferenceServer` (TGI and vLLM cannot run here; it follows TGI's
published API, checked against its OpenAPI document); the local backend runs the tiny teacher model.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import HttpUrl
from redis.asyncio import Redis as AsyncRedis

from gkt.jobs import ErrorEvent, FinalEvent, Guidance, GuidanceEvent, GuidanceSpec, Job, JobKind
from gkt.keys import TEACHER_GROUP, Keys
from gkt.models import load_model
from gkt.queue import enqueue_job, ensure_group, read_events
from services.teacher.backends.base import TeacherBackend
from services.teacher.backends.local import LocalBackend
from services.teacher.backends.openai import OpenAIBackend
from services.teacher.settings import TeacherServerSettings, TeacherSettings
from services.teacher.worker import Dispatch, TeacherWorker
from tests.integration.fake_inference_server import FakeInferenceServer, Reply, ServerFactory
from tests.waiting import until_async

KEYS = Keys("pipe")


@pytest.fixture
async def aredis(redis_url: str, redis: object) -> AsyncIterator[AsyncRedis]:
    client = AsyncRedis.from_url(redis_url)
    await ensure_group(client, keys=KEYS)
    yield client
    await client.aclose()


def _guide(query: str, tokens: int = 3) -> Job:
    return Job(query=query, kind=JobKind.GUIDE, guidance=GuidanceSpec(max_guidance_tokens=tokens))


async def _openai(server: FakeInferenceServer) -> OpenAIBackend:
    settings = TeacherServerSettings(url=HttpUrl(server.url), max_retries=0, request_timeout_s=30)
    backend = OpenAIBackend(settings=settings)
    await backend.start()
    return backend


@contextlib.asynccontextmanager
async def _running(
    aredis: AsyncRedis,
    backend: TeacherBackend,
    dispatch: Dispatch = lambda job, guidance, queue: None,
    **settings: Any,
) -> AsyncIterator[TeacherWorker]:
    worker = TeacherWorker(
        settings=TeacherSettings(
            key_prefix=KEYS.prefix, teacher_name="p1", teacher_temperature=0.0, **settings
        ),
        redis=aredis,
        backend=backend,
        dispatch=dispatch,
    )
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=60)
        await backend.close()


async def _events(aredis: AsyncRedis, job: Job) -> list[Any]:
    return [e for _, e in await read_events(aredis, keys=KEYS, job_id=job.id, after="0", block_ms=1)]


async def _published(aredis: AsyncRedis, job: Job) -> bool:
    return any(isinstance(e, GuidanceEvent) for e in await _events(aredis, job))


async def _acked_only_after_published(aredis: AsyncRedis, entries: dict[str, Job]) -> list[str]:
    """Jobs whose entry is gone from the query stream (acknowledged and deleted) yet have no guidance."""
    present = set(await _entry_ids(aredis))
    return [
        job.id for entry, job in entries.items() if entry not in present and not await _published(aredis, job)
    ]


async def test_each_job_is_published_then_acknowledged_as_it_ends_while_a_slow_one_still_generates(
    aredis: AsyncRedis, servers: ServerFactory
) -> None:
    server = servers()
    gate = threading.Event()
    server.script("slowly", Reply(gate=gate))
    jobs = [_guide("Who answers slowly?"), _guide("Who answers apples?"), _guide("Who answers pears?")]
    entries = {await enqueue_job(aredis, keys=KEYS, job=job): job for job in jobs}
    async with _running(aredis, await _openai(server), teacher_max_in_flight=3):
        violations: list[str] = []

        async def fast_ones_done() -> bool:
            violations.extend(await _acked_only_after_published(aredis, entries))
            return await _published(aredis, jobs[1]) and await _published(aredis, jobs[2])

        await until_async(fast_ones_done, what="the fast jobs' guidance")
        await until_async(lambda: _pending_is(aredis, 1), what="the fast jobs to be acknowledged")
        assert not await _published(aredis, jobs[0])  # the slow one is still at the server
        assert server.exchange(_index(server, "slowly")).status == 0
        gate.set()
        await until_async(lambda: _stream_empty(aredis), what="the slow job to be acknowledged")
        assert not violations + await _acked_only_after_published(aredis, entries)
    for job in jobs:
        final = (await _events(aredis, job))[-1]
        assert isinstance(final, FinalEvent) and final.completion.guidance.text.endswith("is easy.")


async def _pending_is(aredis: AsyncRedis, count: int) -> bool:
    return int((await aredis.xpending(KEYS.queries, TEACHER_GROUP))["pending"]) == count


async def _idle_at_least(aredis: AsyncRedis, count: int, *, ms: int) -> bool:
    """`count` entries pending, each idle `ms` by Redis's clock."""
    rows: Any = await aredis.xpending_range(KEYS.queries, TEACHER_GROUP, min="-", max="+", count=count + 16)
    return len(rows) >= count and all(int(row["time_since_delivered"]) >= ms for row in rows)


async def _stream_empty(aredis: AsyncRedis) -> bool:
    """Every job acknowledged (acknowledged entries are deleted)."""
    return int(await aredis.xlen(KEYS.queries)) == 0


def _index(server: FakeInferenceServer, match: str) -> int:
    (exchange,) = server.generation_requests(match)
    return server.exchanges.index(exchange)


async def test_new_jobs_are_admitted_as_earlier_ones_end_never_more_than_max_in_flight(
    aredis: AsyncRedis, servers: ServerFactory
) -> None:
    server = servers()
    first, second = threading.Event(), threading.Event()
    server.script("first", Reply(gate=first))
    server.script("second", Reply(gate=second))
    jobs = [_guide("Who comes first?"), _guide("Who comes second?")]
    jobs += [_guide(f"Who comes later {i}?") for i in range(4)]
    for job in jobs:
        await enqueue_job(aredis, keys=KEYS, job=job)
    async with _running(aredis, await _openai(server), teacher_max_in_flight=2):
        await until_async(lambda: _received(server, 2), what="the first two jobs at the server")
        assert sorted(_prompt(e) for e in server.generation_requests()) == ["first", "second"]
        second.set()  # one ends: exactly one more is admitted while the first is still held
        await until_async(lambda: _received(server, 3), what="a third job at the server")
        assert server.exchange(_index(server, "first")).status == 0
        await until_async(lambda: _published_all(aredis, jobs[1:3]), what="the second and third jobs")
        first.set()
        await until_async(lambda: _published_all(aredis, jobs), what="every job")
    assert server.max_in_flight == 2


async def _received(server: FakeInferenceServer, count: int) -> bool:
    return len(server.generation_requests()) >= count


async def _published_all(aredis: AsyncRedis, jobs: list[Job]) -> bool:
    return all([await _published(aredis, job) for job in jobs])


def _prompt(exchange: Any) -> str:
    return "first" if "first" in exchange.request_json["prompt"][0] else "second"


async def test_a_refused_job_fails_alone_and_the_others_are_guided(
    aredis: AsyncRedis, servers: ServerFactory
) -> None:
    server = servers(info={"max_input_tokens": 20, "max_total_tokens": 60})
    long, short = _guide("why " * 30), _guide("Who answers?")
    for job in (long, short):
        await enqueue_job(aredis, keys=KEYS, job=job)
    async with _running(aredis, await _openai(server)):
        await until_async(lambda: _stream_empty(aredis), what="both jobs to be acknowledged")
    error = (await _events(aredis, long))[-1]
    assert isinstance(error, ErrorEvent) and (error.code, error.field) == ("INVALID_ARGUMENT", "query")
    assert await _published(aredis, short)


async def test_a_job_whose_student_cannot_be_sent_stays_unacknowledged_for_a_later_claim(
    aredis: AsyncRedis, servers: ServerFactory
) -> None:
    def dispatch(job: Job, guidance: Guidance, queue: str) -> None:
        if "broker" in job.query:
            raise ConnectionError("the broker is away")

    stuck = Job(query="Which one meets a broker outage?", guidance=GuidanceSpec(max_guidance_tokens=3))
    fine = Job(query="Which one goes through?", guidance=GuidanceSpec(max_guidance_tokens=3))
    stuck_entry = await enqueue_job(aredis, keys=KEYS, job=stuck)
    async with _running(aredis, await _openai(servers()), dispatch=dispatch):
        await until_async(lambda: _published(aredis, stuck), what="the first job's guidance")
        fine_entry = await enqueue_job(aredis, keys=KEYS, job=fine)
        await until_async(
            lambda: _stream_holds(aredis, [stuck_entry]), what="the second job to be acknowledged"
        )
        assert fine_entry != stuck_entry and await _published(aredis, fine)
        # the teacher went on, and the job it could not hand to a student is still pending, to be claimed
        pending: Any = await aredis.xpending_range(KEYS.queries, TEACHER_GROUP, min="-", max="+", count=10)
        assert [p["message_id"].decode() for p in pending] == [stuck_entry]


async def _stream_holds(aredis: AsyncRedis, entries: list[str]) -> bool:
    return await _entry_ids(aredis) == entries


async def _entry_ids(aredis: AsyncRedis) -> list[str]:
    entries: Any = await aredis.xrange(KEYS.queries)
    return [entry_id.decode() for entry_id, _ in entries]


async def test_a_dead_teachers_jobs_are_taken_over_and_dead_lettered_one_by_one(
    aredis: AsyncRedis, servers: ServerFactory
) -> None:
    server = servers()
    poisoned, orphan = _guide("Which one kills teachers?"), _guide("Which one was left behind?")
    for job in (poisoned, orphan):
        await enqueue_job(aredis, keys=KEYS, job=job)
    # a dead teacher (no heartbeat) read both; the poisoned one had been delivered twice more before
    await aredis.xreadgroup(TEACHER_GROUP, "dead", {KEYS.queries: ">"}, count=2)
    poisoned_entry = (await _entry_ids(aredis))[0]
    for _ in range(2):
        await aredis.xclaim(
            KEYS.queries, TEACHER_GROUP, "dead", min_idle_time=0, message_ids=[poisoned_entry]
        )
    # entries are taken over only once idle for a second
    await until_async(lambda: _idle_at_least(aredis, 2, ms=1000), what="both entries to be idle for a second")
    async with _running(aredis, await _openai(server), teacher_max_deliveries=3):
        await until_async(lambda: _stream_empty(aredis), what="both jobs to be done with")
    assert await _published(aredis, orphan)
    error = (await _events(aredis, poisoned))[-1]
    assert isinstance(error, ErrorEvent) and error.code == "INTERNAL" and "dead-lettered" in error.message
    letters: Any = await aredis.xrange(KEYS.dead_letters)
    assert [Job.model_validate_json(fields[b"job"]).id for _, fields in letters] == [poisoned.id]
    assert len(server.generation_requests()) == 1  # the poisoned job never reached the server


async def test_the_local_engine_takes_a_new_job_while_a_long_one_generates(
    aredis: AsyncRedis, tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    backend = LocalBackend.from_loaded(load_model(name=str(tiny_models[0]), cache_dir=tmp_path))
    long, short = _guide("Tell me a long story?", tokens=300), _guide("Short?", tokens=1)
    await enqueue_job(aredis, keys=KEYS, job=long)
    async with _running(aredis, backend, teacher_max_in_flight=4):
        await until_async(lambda: _pending_is(aredis, 1), what="the long job to be read")
        await enqueue_job(aredis, keys=KEYS, job=short)
        await until_async(lambda: _published(aredis, short), what="the short job's guidance")
        # the short job joined the running batch and left it while the long one went on
        assert not await _published(aredis, long)
    assert await _published(aredis, long)  # a stopping teacher publishes what it holds
