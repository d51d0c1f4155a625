"""The teacher against a real Redis: dynamic batching, publishing, acking, reclaiming."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis as AsyncRedis

from gkt.decoding import encode
from gkt.errors import StatusCode
from gkt.jobs import (
    ErrorEvent,
    FinalEvent,
    Guidance,
    GuidanceEvent,
    GuidanceMode,
    GuidanceSpec,
    Job,
    JobKind,
    Task,
)
from gkt.keys import TEACHER_GROUP, Keys
from gkt.liveness import teacher_capacity
from gkt.models import load_model
from gkt.prompts import teacher_prompt
from gkt.queue import enqueue_job, ensure_group, read_events
from services.teacher.backends.base import BackendError, GenerationRequest, GenerationResult
from services.teacher.backends.echo import EchoBackend
from services.teacher.backends.local import LocalBackend
from services.teacher.batching import claim_from_dead, claim_stale, collect_batch
from services.teacher.settings import TeacherSettings
from services.teacher.worker import TeacherWorker

KEYS = Keys("itest")


@pytest.fixture
async def aredis(redis_url: str, redis: object) -> AsyncIterator[AsyncRedis]:
    client = AsyncRedis.from_url(redis_url)
    await ensure_group(client, keys=KEYS)
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def backend(tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> LocalBackend:
    return LocalBackend.from_loaded(
        load_model(name=str(tiny_models[0]), cache_dir=tmp_path_factory.mktemp("c"))
    )


def _job(query: str, **kwargs: object) -> Job:
    return Job(query=query, guidance=GuidanceSpec(max_guidance_tokens=4), **kwargs)  # type: ignore[arg-type]


async def _pending_idle(aredis: AsyncRedis, *, count: int, at_least_ms: int) -> None:
    """Until `count` entries of the query stream are pending, each idle `at_least_ms` by Redis's clock."""
    deadline = time.monotonic() + 20
    while True:
        rows: Any = await aredis.xpending_range(
            KEYS.queries, TEACHER_GROUP, min="-", max="+", count=count + 16
        )
        if len(rows) >= count and all(int(row["time_since_delivered"]) >= at_least_ms for row in rows):
            return
        assert time.monotonic() < deadline, f"{count} entries not pending and idle {at_least_ms} ms: {rows}"
        await asyncio.sleep(0.02)


async def test_a_batch_closes_when_full_without_waiting(aredis: AsyncRedis) -> None:
    for i in range(5):
        await enqueue_job(aredis, keys=KEYS, job=_job(f"q{i}"))
    started = time.monotonic()
    batch, broken = await collect_batch(
        aredis, keys=KEYS, consumer="t1", max_batch_size=3, max_wait_ms=5000, block_ms=100
    )
    assert [d.job.query for d in batch] == ["q0", "q1", "q2"]
    assert not broken
    assert time.monotonic() - started < 4  # did not sit out the 5 s window


async def test_a_batch_closes_max_wait_after_its_first_job(aredis: AsyncRedis) -> None:
    async def late_arrivals() -> None:
        await enqueue_job(aredis, keys=KEYS, job=_job("first"))
        await asyncio.sleep(0.05)
        await enqueue_job(aredis, keys=KEYS, job=_job("within the window"))
        await asyncio.sleep(0.6)
        await enqueue_job(aredis, keys=KEYS, job=_job("after the window"))

    producer = asyncio.create_task(late_arrivals())
    batch, _ = await collect_batch(
        aredis, keys=KEYS, consumer="t1", max_batch_size=8, max_wait_ms=300, block_ms=2000
    )
    await producer
    assert [d.job.query for d in batch] == ["first", "within the window"]


async def test_unreadable_entries_are_reported_not_fatal(aredis: AsyncRedis) -> None:
    await aredis.xadd(KEYS.queries, {"job": b"{not json"})
    await enqueue_job(aredis, keys=KEYS, job=_job("fine"))
    batch, broken = await collect_batch(
        aredis, keys=KEYS, consumer="t1", max_batch_size=2, max_wait_ms=50, block_ms=100
    )
    assert [d.job.query for d in batch] == ["fine"]
    assert len(broken) == 1


async def test_worker_publishes_guidance_dispatches_students_and_acks(
    aredis: AsyncRedis, backend: LocalBackend
) -> None:
    dispatched: list[tuple[Job, Guidance]] = []
    worker = TeacherWorker(
        settings=TeacherSettings(key_prefix=KEYS.prefix, teacher_temperature=0.0),
        redis=aredis,
        backend=backend,
        dispatch=lambda job, guidance, queue: dispatched.append((job, guidance)),
    )
    jobs = [
        _job("cutoff job"),
        _job("guide job", kind=JobKind.GUIDE),
        Job(query="student alone", guidance=GuidanceSpec(mode=GuidanceMode.NONE)),
        _job("too late", deadline=time.time() - 1),
    ]
    for job in jobs:
        await enqueue_job(aredis, keys=KEYS, job=job)
    batch, _ = await collect_batch(
        aredis, keys=KEYS, consumer="t1", max_batch_size=8, max_wait_ms=50, block_ms=100
    )
    await worker.process(batch)

    # (sent side by side from threads: in any order)
    by_query = {job.query: guidance for job, guidance in dispatched}
    assert sorted(by_query) == ["cutoff job", "student alone"] and len(dispatched) == 2
    cutoff_guidance = by_query["cutoff job"]
    assert cutoff_guidance.token_count == 4 and cutoff_guidance.batch_size == 4
    assert by_query["student alone"].text == "" and by_query["student alone"].token_count == 0

    guide_events = [
        e for _, e in await read_events(aredis, keys=KEYS, job_id=jobs[1].id, after="0", block_ms=10)
    ]
    assert isinstance(guide_events[0], GuidanceEvent) and isinstance(guide_events[-1], FinalEvent)
    late_events = [
        e for _, e in await read_events(aredis, keys=KEYS, job_id=jobs[3].id, after="0", block_ms=10)
    ]
    assert late_events == [
        ErrorEvent(code=StatusCode.DEADLINE_EXCEEDED, message="the deadline passed while the job was queued")
    ]
    # acknowledged and deleted: the stream holds nothing, nothing is pending
    assert await aredis.xlen(KEYS.queries) == 0
    assert (await aredis.xpending(KEYS.queries, TEACHER_GROUP))["pending"] == 0
    # the batch's time is this teacher's pace, from which gateways estimate a new job's wait
    paces = await aredis.hgetall(KEYS.teacher_pace)
    name = worker.settings.teacher_name.encode()
    assert set(paces) == {name}
    assert 0 < teacher_capacity(paces, now=time.time()) == pytest.approx(8 / float(paces[name].split()[0]))
    # every key the job created expires
    assert 0 < await aredis.ttl(KEYS.events(jobs[1].id)) <= 3600


async def test_jobs_of_a_dead_teacher_are_reclaimed(aredis: AsyncRedis) -> None:
    await enqueue_job(aredis, keys=KEYS, job=_job("orphan"))
    taken, _ = await collect_batch(
        aredis, keys=KEYS, consumer="dead", max_batch_size=1, max_wait_ms=0, block_ms=100
    )
    assert taken
    await _pending_idle(aredis, count=1, at_least_ms=100)
    claimed, broken, deliveries = await claim_stale(
        aredis, keys=KEYS, consumer="alive", min_idle_ms=100, count=10
    )
    assert [d.job.query for d in claimed] == ["orphan"]
    assert deliveries[claimed[0].entry_id] == 2
    assert not broken


async def test_a_prompt_beyond_the_models_context_fails_alone_naming_the_field(backend: LocalBackend) -> None:
    context = backend._loaded().context_window
    assert context == 4096  # the tiny teacher's

    def request(query: str, max_guidance_tokens: int = 4) -> GenerationRequest:
        prompt = teacher_prompt(task=Task.GSM8K, mode=GuidanceMode.CUTOFF, query=query)
        return GenerationRequest(prompt=prompt, max_guidance_tokens=max_guidance_tokens)

    # "x " is two tokens of the tiny vocabulary; the exemplars are about 730 more.
    assert len(encode(backend._loaded(), request("x " * 1500).prompt)) < 4096 - 300
    fits, too_long, too_much = await backend.generate_batch(
        [request("How many trees?"), request("x " * 2500), request("x " * 1500, max_guidance_tokens=2000)]
    )
    assert isinstance(fits, GenerationResult) and fits.token_count > 0
    assert isinstance(too_long, BackendError)
    assert (too_long.code, too_long.field) == ("INVALID_ARGUMENT", "query")
    assert "context is 4096 tokens" in too_long.message
    assert isinstance(too_much, BackendError)
    assert (too_much.code, too_much.field) == ("INVALID_ARGUMENT", "guidance.max_guidance_tokens")
    assert "is 2000" in too_much.message and "room for at most" in too_much.message


async def test_cancelled_jobs_are_answered_cancelled_ungenerated_and_free_their_tenants_slots(
    aredis: AsyncRedis,
) -> None:
    prompts: list[str] = []

    class Recording(EchoBackend):
        async def generate_batch(
            self, requests: Sequence[GenerationRequest]
        ) -> list[GenerationResult | BackendError]:
            prompts.extend(r.prompt for r in requests)
            return await super().generate_batch(requests)

    worker = TeacherWorker(
        settings=TeacherSettings(key_prefix=KEYS.prefix),
        redis=aredis,
        backend=Recording(),
        dispatch=lambda job, guidance, queue: None,
    )
    kept, cancelled = (
        _job("kept question", kind=JobKind.GUIDE),
        _job("cancelled question", kind=JobKind.GUIDE),
    )
    for job in (kept, cancelled):
        await aredis.zadd(KEYS.queued("tenant-1"), {job.id: time.time() * 1000 + 60_000})
        await enqueue_job(aredis, keys=KEYS, job=job, tenant="tenant-1")
    await aredis.set(KEYS.cancelled(cancelled.id), "1")
    batch, _ = await collect_batch(
        aredis, keys=KEYS, consumer="t1", max_batch_size=8, max_wait_ms=50, block_ms=100
    )
    assert {d.tenant for d in batch} == {"tenant-1"}
    await worker.process(batch)

    assert len(prompts) == 1 and "kept question" in prompts[0]
    events = await read_events(aredis, keys=KEYS, job_id=cancelled.id, after="0-0", block_ms=100)
    last = events[-1][1]
    assert isinstance(last, ErrorEvent) and last.code == "CANCELLED"
    assert await aredis.zcard(KEYS.queued("tenant-1")) == 0  # both slots freed with the ack
    assert await aredis.xlen(KEYS.queries) == 0


async def test_jobs_of_a_teacher_whose_heartbeat_is_gone_are_taken_over_and_dead_teachers_leave_the_group(
    aredis: AsyncRedis,
) -> None:
    await ensure_group(aredis, keys=KEYS)
    for i in range(4):
        await enqueue_job(aredis, keys=KEYS, job=Job(query=f"Held {i}?"))
    # "dead" read three jobs and has no heartbeat; "alive" read one and beats; "gone" holds nothing
    await aredis.xreadgroup(TEACHER_GROUP, "dead", {KEYS.queries: ">"}, count=3)
    await aredis.xreadgroup(TEACHER_GROUP, "alive", {KEYS.queries: ">"}, count=1)
    await aredis.xreadgroup(TEACHER_GROUP, "gone", {KEYS.queries: ">"}, count=1)
    await aredis.set(KEYS.heartbeat("teacher", "alive"), "1", ex=60)
    await _pending_idle(aredis, count=4, at_least_ms=1000)  # entries are claimed only once idle for a second

    claimed, broken, deliveries = await claim_from_dead(aredis, keys=KEYS, consumer="me", count=8)

    assert ([d.job.query for d in claimed], broken) == (["Held 0?", "Held 1?", "Held 2?"], [])
    assert set(deliveries.values()) == {2}
    consumers = {
        c["name"].decode(): c["pending"] for c in await aredis.xinfo_consumers(KEYS.queries, TEACHER_GROUP)
    }
    assert consumers == {"dead": 0, "alive": 1, "me": 3}
    # the next round removes the dead teacher that holds nothing any more; a claim is taken once
    again, _, _ = await claim_from_dead(aredis, keys=KEYS, consumer="other", count=8)
    assert again == []
    consumers = {
        c["name"].decode(): c["pending"] for c in await aredis.xinfo_consumers(KEYS.queries, TEACHER_GROUP)
    }
    assert consumers == {"alive": 1, "me": 3}
