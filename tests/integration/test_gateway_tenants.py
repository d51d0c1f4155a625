"""Tenants kept apart: a request id, a job's cancellation and a queue slot belong to the API key that sent it.

A real gateway with three API keys and a real Redis; a real teacher worker on the echo backend (its guidance
is the question's first words, so an answer shows whose question it came from), started when a test wants
answers. `Guide` and guidance mode FULL are answered by the teacher alone: no student is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis import Redis

from gkt.connections import connect_async
from gkt.jobs import Guidance, Job
from gkt.keys import Keys
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from services.gateway.auth import hash_key
from services.gateway.server import Gateway
from services.gateway.settings import GatewaySettings
from services.teacher.backends.base import BackendError, GenerationRequest, GenerationResult
from services.teacher.backends.echo import EchoBackend
from services.teacher.settings import TeacherSettings
from services.teacher.worker import TeacherWorker

KEYS = Keys("tenants")
RPCS = ("Generate", "GenerateStream", "Guide")


class RecordingEcho(EchoBackend):
    """The echo backend, keeping every prompt it was asked to generate from."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    async def generate_batch(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | BackendError]:
        self.prompts.extend(request.prompt for request in requests)
        return await super().generate_batch(requests)

    async def generate(self, request: GenerationRequest) -> GenerationResult | BackendError:
        self.prompts.append(request.prompt)
        return await super().generate(request)


def _no_student(job: Job, guidance: Guidance, queue: str) -> None:
    raise AssertionError(f"job {job.id} asked for a student: these tests use Guide and mode FULL only")


@contextlib.asynccontextmanager
async def _gateway(redis_url: str, tmp_path: Path, **overrides: object) -> AsyncIterator[str]:
    keys_file = tmp_path / "keys"
    keys_file.write_text(
        f"{hash_key('team-a-key')} name=team-a queued=3\n"
        f"{hash_key('team-b-key')} name=team-b\n"
        f"{hash_key('team-c-key')} name=team-c\n"
    )
    values: dict[str, object] = {
        "redis_url": redis_url,
        "gateway_addr": f"127.0.0.1:{free_port()}",
        "gateway_metrics_port": 0,
        "key_prefix": KEYS.prefix,
        "gateway_api_keys_file": keys_file,
    }
    gateway = Gateway(GatewaySettings(**{**values, **overrides}))  # type: ignore[arg-type]
    await gateway.start()
    try:
        yield gateway.settings.gateway_addr
    finally:
        await gateway.stop()


@contextlib.asynccontextmanager
async def _teacher(redis_url: str, backend: EchoBackend) -> AsyncIterator[None]:
    client = connect_async(redis_url)
    worker = TeacherWorker(
        settings=TeacherSettings(redis_url=redis_url, key_prefix=KEYS.prefix, teacher_metrics_port=0),
        redis=client,
        backend=backend,
        dispatch=_no_student,
    )
    running = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        worker.stop()
        await running
        await client.aclose()


async def _ask(
    channel: grpc.aio.Channel, rpc: str, *, who: str, query: str, request_id: str = "", timeout_s: float = 30
) -> str:
    """Send `query` as `who` by `rpc`; returns the answer's text (the teacher's, echoing the question)."""
    stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
    metadata = (("authorization", f"Bearer {who}-key"),)
    if rpc == "Guide":
        guide = pb.GuideRequest(query=query, request_id=request_id)
        return (await stub.Guide(guide, timeout=timeout_s, metadata=metadata)).guidance
    request = pb.GenerateRequest(
        query=query, request_id=request_id, guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_FULL)
    )
    if rpc == "Generate":
        return (await stub.Generate(request, timeout=timeout_s, metadata=metadata)).text
    replies = [reply async for reply in stub.GenerateStream(request, timeout=timeout_s, metadata=metadata)]
    return replies[-1].final.text


async def _refused(call: Awaitable[str]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def _queued(redis: Redis) -> list[Job]:
    entries: Any = redis.xrange(KEYS.queries)
    return [Job.model_validate_json(fields[b"job"]) for _, fields in entries]


async def _until(check: Callable[[], object], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("rpc", RPCS)
async def test_a_request_id_attaches_only_within_its_key_and_only_its_sender_cancels(
    redis_url: str, redis: Redis, tmp_path: Path, rpc: str
) -> None:
    async with (
        _gateway(redis_url, tmp_path) as addr,
        grpc.aio.insecure_channel(addr) as channel,
    ):
        # team-a's job waits in the queue: no teacher reads it yet
        first = asyncio.ensure_future(
            _ask(channel, rpc, who="team-a", query="alpha asks first", request_id="order-42")
        )
        await _until(lambda: redis.xlen(KEYS.queries) == 1)

        # team-a retrying attaches to that job: nothing new is queued, and its deadline passing (the
        # gateway sees the call end) does not cancel a job this call did not send
        retry = await _refused(
            _ask(channel, rpc, who="team-a", query="a retry", request_id="order-42", timeout_s=0.5)
        )
        assert retry.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert redis.xlen(KEYS.queries) == 1

        # team-b sending the same id gets a job of its own; its deadline cancels that job alone
        other = await _refused(
            _ask(channel, rpc, who="team-b", query="beta asks second", request_id="order-42", timeout_s=0.5)
        )
        assert other.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        alpha, beta = _queued(redis)
        assert (alpha.query, beta.query) == ("alpha asks first", "beta asks second")
        await _until(lambda: redis.exists(KEYS.cancelled(beta.id)))
        assert not redis.exists(KEYS.cancelled(alpha.id))

        async with _teacher(redis_url, EchoBackend()):
            assert await first == "alpha asks first"
            # after completion: team-a's retry gets team-a's answer; team-c's same id is a new question,
            # and team-b's retry finds only its own job, which ended unanswered, so it is asked afresh: its
            # own answer, never team-a's
            assert await _ask(channel, rpc, who="team-a", query="a retry", request_id="order-42") == (
                "alpha asks first"
            )
            assert await _ask(channel, rpc, who="team-c", query="gamma asks last", request_id="order-42") == (
                "gamma asks last"
            )
            assert await _ask(channel, rpc, who="team-b", query="beta again", request_id="order-42") == (
                "beta again"
            )


async def test_one_keys_burst_of_cancelled_calls_is_bounded_and_never_generated(
    redis_url: str, redis: Redis, tmp_path: Path
) -> None:
    """team-a (3 queued jobs at most) opens and cancels calls as fast as it can; team-b is still served."""
    async with (
        _gateway(redis_url, tmp_path, gateway_max_queue_depth=6) as addr,
        grpc.aio.insecure_channel(addr) as channel,
    ):
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
        abusive = (("authorization", "Bearer team-a-key"),)
        for opened in range(1, 4):
            call = stub.GenerateStream(
                pb.GenerateRequest(query=f"abuse {opened}"), timeout=30, metadata=abusive
            )
            await _until(lambda n=opened: redis.xlen(KEYS.queries) == n)  # type: ignore[misc]
            call.cancel()
        cancelled = _queued(redis)
        await _until(lambda: all(redis.exists(KEYS.cancelled(job.id)) for job in cancelled))

        # the cancelled jobs still wait for a teacher, so they still count against team-a's queue ...
        refused = await _refused(_ask(channel, "Guide", who="team-a", query="abuse 4"))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "team-a" in (refused.details() or "") and "waiting for a teacher" in (refused.details() or "")
        # ... but not against team-b's, and the queue as a whole has room
        served = asyncio.ensure_future(_ask(channel, "Guide", who="team-b", query="beta is served"))
        await _until(lambda: redis.xlen(KEYS.queries) == 4)

        backend = RecordingEcho()
        async with _teacher(redis_url, backend):
            assert await served == "beta is served"
            # the teacher dropped team-a's cancelled jobs before generating, which freed their slots
            assert not any("abuse" in prompt for prompt in backend.prompts)
            await _until(lambda: redis.zcard(KEYS.queued(_key_id("team-a-key"))) == 0)
            assert (
                await _ask(channel, "Guide", who="team-a", query="alpha behaves now") == "alpha behaves now"
            )


def _key_id(key: str) -> str:
    return hash_key(key).removeprefix("sha256:")[:16]
