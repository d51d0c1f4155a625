"""The raw floors: a bare Redis-stream round trip and a bare Celery task round trip.

They carry no GKT code, so the orchestration overhead of the full path can be read against what
Redis and Celery cost on the same machine. `gkt bench` starts both helpers as subprocesses:
`python -m gkt_tools.bench.floors URL STREAM` (the stream responder) and a Celery worker on
`gkt_tools.bench.floor_worker`.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

from celery import Celery
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gkt_tools.bench.load import Call
from gkt_tools.bench.stats import Sample
from gkt_tools.processes import child_environment

FLOOR_QUEUE = "gkt-bench-floor"
FLOOR_TASK = "gkt.bench.floor"
_GROUP = "floor"
_REPLY_TTL_S = 60


def redis_call(redis: AsyncRedis, *, stream: str) -> Call:
    """XADD a request to `stream`, then block on its reply stream (the gateway's two steps)."""

    async def call(index: int) -> Sample:
        key = f"{stream}:reply:{uuid.uuid4().hex}"
        started = time.perf_counter()
        await redis.xadd(stream, {"reply": key})
        return await _await_reply(redis, key, started)

    return call


def celery_call(redis: AsyncRedis, client: Celery) -> Call:
    """Send a Celery task (as the teacher dispatches a student), then block on its reply stream."""

    async def call(index: int) -> Sample:
        key = f"{FLOOR_QUEUE}:reply:{uuid.uuid4().hex}"
        started = time.perf_counter()
        client.send_task(FLOOR_TASK, args=[key], queue=FLOOR_QUEUE)
        return await _await_reply(redis, key, started)

    return call


def floor_client(redis_url: str) -> Celery:
    """A sending-only Celery app, like the teacher's `student_client`."""
    client = Celery("gkt-bench-floor-client", broker=redis_url)
    client.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)
    return client


@contextlib.contextmanager
def floor_processes(*, redis_url: str, stream: str, log_dir: Any) -> Iterator[None]:
    """Run the stream responder and a one-process Celery worker until the block ends."""
    env = child_environment({"GKT_REDIS_URL": redis_url})
    commands = {
        "floor-responder": [sys.executable, "-m", "gkt_tools.bench.floors", redis_url, stream],
        "floor-celery": [
            sys.executable, "-m", "celery", "-A", "gkt_tools.bench.floor_worker", "worker", "-Q", FLOOR_QUEUE,
            "--concurrency", "1", "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle",
            "--loglevel", "WARNING", "--hostname", f"floor-{uuid.uuid4().hex[:6]}@%h",
        ],
    }  # fmt: skip
    processes = []
    try:
        for name, command in commands.items():
            log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        yield
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _await_reply(redis: AsyncRedis, key: str, started: float) -> Sample:
    reply: Any = await redis.xread({key: "0"}, block=30_000)
    latency = time.perf_counter() - started
    return Sample(latency_s=latency) if reply else Sample(latency_s=latency, ok=False, error="TIMEOUT")


def reply(redis: Redis, key: str) -> None:
    """Answer a request on its reply stream."""
    pipe = redis.pipeline(transaction=False)
    pipe.xadd(key, {"e": "done"})
    pipe.expire(key, _REPLY_TTL_S)
    pipe.execute()


def respond(redis_url: str, stream: str) -> None:
    """The stream responder: read requests in a consumer group, answer each, ack them, forever."""
    redis = Redis.from_url(redis_url)
    with contextlib.suppress(Exception):  # BUSYGROUP: it exists already
        redis.xgroup_create(stream, _GROUP, id="0", mkstream=True)
    while True:
        reply: Any = redis.xreadgroup(_GROUP, "responder", {stream: ">"}, count=64, block=1000)
        for _stream, entries in reply or []:
            pipe = redis.pipeline(transaction=False)
            for _entry_id, fields in entries:
                key = fields[b"reply"].decode()
                pipe.xadd(key, {"e": "done"})
                pipe.expire(key, _REPLY_TTL_S)
            ids = [entry_id for entry_id, _ in entries]
            pipe.xack(stream, _GROUP, *ids)
            pipe.xdel(stream, *ids)
            pipe.execute()


if __name__ == "__main__":
    respond(sys.argv[1], sys.argv[2])
