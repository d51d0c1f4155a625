"""Retries with the same request_id: a retry brings its own deadline, replays the stored answer of a job that
was answered, and starts afresh when the earlier attempt ended unanswered (cancelled, past its deadline,
failed).

A real gateway and Redis; the test plays the workers, answering the jobs it finds in the query stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gkt.errors import StatusCode
from gkt.jobs import Completion, ErrorEvent, FinalEvent, Guidance, GuidanceEvent, Job
from gkt.keys import Keys
from gkt.queue import publish_events
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from services.gateway.server import Gateway
from services.gateway.settings import GatewaySettings
from tests.waiting import until_async

KEYS = Keys("retries")


def _request(request_id: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(query="Shall I retry?", request_id=request_id)


@contextlib.asynccontextmanager
async def _stub(redis_url: str) -> AsyncIterator[guidance_pb2_grpc.GuidanceServiceStub]:
    settings = GatewaySettings(
        redis_url=redis_url,
        gateway_addr=f"127.0.0.1:{free_port()}",
        gateway_metrics_port=0,
        key_prefix=KEYS.prefix,
    )
    gateway = Gateway(settings)
    await gateway.start()
    try:
        async with grpc.aio.insecure_channel(settings.gateway_addr) as channel:
            yield guidance_pb2_grpc.GuidanceServiceStub(channel)
    finally:
        await gateway.stop()


async def _queued_job(redis: Redis, *, after: int) -> Job:
    """The job that arrives in the query stream after the first `after` entries."""
    deadline = time.monotonic() + 10
    while redis.xlen(KEYS.queries) <= after:
        if time.monotonic() > deadline:
            pytest.fail(f"no job arrived after the first {after}")
        await asyncio.sleep(0.02)
    entries: Any = redis.xrange(KEYS.queries)
    return Job.model_validate_json(entries[after][1][b"job"])


async def _answer(redis_url: str, job: Job, text: str) -> None:
    guidance = Guidance(text="", token_count=0, finish_reason="none")
    client = AsyncRedis.from_url(redis_url)
    await publish_events(
        client,
        keys=KEYS,
        events=[
            (job.id, GuidanceEvent(guidance=guidance)),
            (job.id, FinalEvent(completion=Completion(text=text, guidance=guidance))),
        ],
        ttl_s=60,
    )
    await client.aclose()


async def _fail(redis_url: str, job: Job) -> None:
    client = AsyncRedis.from_url(redis_url)
    event = ErrorEvent(code=StatusCode.INTERNAL, message="the student crashed")
    await publish_events(client, keys=KEYS, events=[(job.id, event)], ttl_s=60)
    await client.aclose()


async def test_a_retry_of_an_answered_job_replays_its_answer_by_its_own_deadline(
    redis_url: str, redis: Redis
) -> None:
    async with _stub(redis_url) as stub:
        first = asyncio.ensure_future(stub.Generate(_request("answered"), timeout=1.0))
        job = await _queued_job(redis, after=0)
        await _answer(redis_url, job, "42")
        assert (await first).text == "42"
        await asyncio.sleep(max(0.0, (job.deadline or 0) - time.time()) + 0.2)  # the first deadline passed

        retried = await stub.Generate(_request("answered"), timeout=5)

        assert (retried.text, retried.job_id) == ("42", job.id)
        assert redis.xlen(KEYS.queries) == 1  # no second job


async def test_a_retry_after_deadline_exceeded_starts_a_fresh_job(redis_url: str, redis: Redis) -> None:
    async with _stub(redis_url) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.Generate(_request("late"), timeout=0.5)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        first = await _queued_job(redis, after=0)

        retry = asyncio.ensure_future(stub.Generate(_request("late"), timeout=10))
        fresh = await _queued_job(redis, after=1)
        await _answer(redis_url, fresh, "in time")

        assert fresh.id != first.id
        assert ((await retry).text, (await retry).job_id) == ("in time", fresh.id)


async def test_a_retry_after_a_client_cancel_starts_a_fresh_job(redis_url: str, redis: Redis) -> None:
    async with _stub(redis_url) as stub:
        call = stub.GenerateStream(_request("cancelled"), timeout=10)
        first = await _queued_job(redis, after=0)
        call.cancel()
        deadline = time.monotonic() + 10
        while not redis.exists(KEYS.cancelled(first.id)):  # the gateway marks the job cancelled
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

        retry = asyncio.ensure_future(stub.Generate(_request("cancelled"), timeout=10))
        fresh = await _queued_job(redis, after=1)
        await _answer(redis_url, fresh, "again")

        assert fresh.id != first.id
        assert (await retry).text == "again"


async def test_a_retry_after_a_failure_starts_a_fresh_job(redis_url: str, redis: Redis) -> None:
    async with _stub(redis_url) as stub:
        call = asyncio.ensure_future(stub.Generate(_request("failed"), timeout=10))
        first = await _queued_job(redis, after=0)
        await _fail(redis_url, first)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        assert failed.value.code() == grpc.StatusCode.INTERNAL

        retry = asyncio.ensure_future(stub.Generate(_request("failed"), timeout=10))
        fresh = await _queued_job(redis, after=1)
        await _answer(redis_url, fresh, "fixed")

        assert fresh.id != first.id
        assert (await retry).text == "fixed"


async def test_a_retry_while_the_job_runs_attaches_to_it(
    redis_url: str, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.gateway.service")
    async with _stub(redis_url) as stub:
        first = asyncio.ensure_future(stub.Generate(_request("running"), timeout=30))
        job = await _queued_job(redis, after=0)
        retry = asyncio.ensure_future(stub.Generate(_request("running"), timeout=30))

        async def attached() -> bool:
            return "request_id seen before: attaching to its job" in caplog.messages

        await until_async(attached, what="the retry to find the running job")
        await _answer(redis_url, job, "shared")

        assert [(r.text, r.job_id) for r in await asyncio.gather(first, retry)] == [("shared", job.id)] * 2
        assert redis.xlen(KEYS.queries) == 1
