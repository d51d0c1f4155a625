"""A bounded soak on loopback: many requests of mixed sizes, some cancelled at random, through the real
stack. Every job must be accounted for, no status other than the expected ones may appear, every key the
jobs left in Redis must expire, and the gateway's memory must stay flat.

GKT_SOAK_REQUESTS scales it (default 600 here; `GKT_SOAK_REQUESTS=5000` for a longer run).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import grpc
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis import Redis

from gkt.jobs import ErrorEvent, FinalEvent
from gkt.keys import Keys
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.stack import Stack
from tests.events import job_events


class SoakSettings(BaseSettings):
    """`make soak` sets GKT_SOAK_REQUESTS for a longer run."""

    model_config = SettingsConfigDict(env_prefix="GKT_", extra="ignore")

    soak_requests: int = Field(default=600, ge=1, description="Requests the soak sends.")


REQUESTS = SoakSettings().soak_requests
CONCURRENCY = 32
KEYS = Keys("e2e")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _request(rng: random.Random, i: int) -> pb.GenerateRequest:
    mode = rng.choice([pb.GUIDANCE_MODE_CUTOFF, pb.GUIDANCE_MODE_CUTOFF, pb.GUIDANCE_MODE_NONE])
    return pb.GenerateRequest(
        query=f"Soak question {i}: " + "word " * rng.randint(0, 60),
        task=rng.choice([pb.TASK_GSM8K, pb.TASK_CSQA, pb.TASK_FREEFORM]),
        guidance=pb.GuidanceParams(mode=mode, max_guidance_tokens=rng.randint(1, 8)),
        sampling=pb.SamplingParams(
            temperature=rng.choice([0.0, 0.7, 1.0]), max_new_tokens=rng.randint(1, 24), seed=i
        ),
    )


async def _soak(addr: str, gateway_pid: int) -> tuple[Counter[str], list[str], list[int]]:
    rng = random.Random(0)
    outcomes: Counter[str] = Counter()
    answered: list[str] = []
    rss: list[int] = []
    limit = asyncio.Semaphore(CONCURRENCY)

    async with grpc.aio.insecure_channel(addr) as channel:
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)

        async def one(i: int) -> None:
            request = _request(rng, i)
            cancel = rng.random() < 0.1
            async with limit:
                try:
                    if cancel:
                        call = stub.GenerateStream(request, timeout=120)
                        async for _event in call:
                            call.cancel()  # after the first event (the guidance), the client goes away
                            break
                        outcomes["cancelled"] += 1
                        return
                    reply = await stub.Generate(request, timeout=120)
                    answered.append(reply.job_id)
                    outcomes["ok"] += 1
                except grpc.aio.AioRpcError as exc:
                    outcomes[exc.code().name] += 1
            if i % (REQUESTS // 4) == 0:
                rss.append(_rss_kib(gateway_pid))

        await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    rss.append(_rss_kib(gateway_pid))
    return outcomes, answered, rss


def test_a_soak_accounts_for_every_job_and_keeps_memory_flat(tiny_stack: Stack) -> None:
    gateway_pid = tiny_stack.processes["gateway"].pid
    outcomes, answered, rss = asyncio.run(_soak(tiny_stack.gateway_addr or "", gateway_pid))
    print(f"\nsoak: {REQUESTS} requests, outcomes {dict(outcomes)}, gateway RSS KiB at each quarter {rss}")

    assert sum(outcomes.values()) == REQUESTS  # every request got exactly one outcome
    assert set(outcomes) <= {"ok", "cancelled"}, outcomes  # no INTERNAL, UNKNOWN, lost deadline
    assert outcomes["ok"] == len(set(answered)) == REQUESTS - outcomes["cancelled"]

    redis = Redis.from_url(tiny_stack.redis_url or "")
    for job_id in answered:
        events = job_events(redis, KEYS, job_id)
        assert sum(isinstance(e, FinalEvent | ErrorEvent) for _, e in events) == 1
    # nothing a job left behind lives forever: the only keys without a lifetime are the stack's own
    # (the query stream, the students' job books, whose entries leave with their jobs, and Celery's)
    permanent = {KEYS.queries, KEYS.student_running, KEYS.student_dispatched, KEYS.student_dispatched_at}
    for key in redis.scan_iter(match=f"{KEYS.prefix}:*"):
        name = key.decode()
        if name in permanent or name.startswith((f"{KEYS.prefix}:_kombu.", f"{KEYS.prefix}:unacked")):
            continue
        assert redis.ttl(key) > 0, key
    for book in (KEYS.student_running, KEYS.student_dispatched):
        assert redis.hlen(book) == 0, book  # every job left them
    redis.close()
    # flat: after the first quarter (allocator and caches warm), the gateway grows by less than 10 %
    assert rss[-1] < rss[1] * 1.10, rss
