"""Every kind of Redis client GKT Serve builds follows a Sentinel failover: a real group (a master, a
replica, three redis-sentinel processes on loopback) whose master is SIGKILLed under the clients."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gkt.connections import connect, connect_async, connect_bounded, connect_reader, outlasting
from gkt.dispatch import student_client
from gkt.keys import STUDENT_QUEUE, Keys
from gkt_tools.sentinel import SentinelGroup

KEYS = Keys("sentinel")


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path / "group")
    group.start()
    yield group
    group.stop()


def test_a_waiting_client_rides_out_a_failover_and_writes_to_the_new_master(group: SentinelGroup) -> None:
    # A student's client: its publish during the failover waits and lands on the promoted replica.
    redis = connect(group.url, retry=outlasting(30))
    redis.set("before", "1")
    old = group.master()
    group.kill_master()
    started = time.monotonic()

    redis.set("during", "2")  # no error: the client waits until the sentinels name a new master

    assert time.monotonic() - started < 30
    new = group.master()
    assert new != old
    assert connect(group.url).get("during") == b"2"
    assert redis.get("before") == b"1"  # replicated before the kill


async def test_the_gateways_clients_and_the_teachers_reach_the_new_master(group: SentinelGroup) -> None:
    bounded = connect_bounded(group.url, max_connections=4, wait_s=5, client_name="gkt-gateway")
    reader = connect_reader(group.url, client_name="gkt-gateway-reader")
    teacher = connect_async(group.url)
    for client in (bounded, reader, teacher):
        await client.set("ping", "pong")
    old = group.kill_master()
    new = await asyncio.to_thread(group.wait_failover, old)

    for client in (bounded, reader, teacher):
        # A connection to the dead master fails once; the next command asks the sentinels again.
        for attempt in range(2):
            try:
                assert await client.get("ping") == b"pong"
                break
            except RedisConnectionError:
                assert attempt == 0
        info: Any = await client.info("server")
        assert int(info["tcp_port"]) == group.ports[new]
    for client in (bounded, reader, teacher):
        await client.aclose()


def test_a_student_task_sent_during_a_failover_reaches_the_new_masters_queue(group: SentinelGroup) -> None:
    app = student_client(broker_url=group.url, key_prefix=KEYS.prefix)
    app.send_task("gkt.test.before", queue=STUDENT_QUEUE)
    killed = threading.Event()

    def kill() -> None:
        group.kill_master()
        killed.set()

    threading.Thread(target=kill).start()
    killed.wait(timeout=10)
    app.send_task("gkt.test.during", queue=STUDENT_QUEUE)  # kombu retries until the new master answers

    queue: Any = connect(group.url).lrange(KEYS.student_queue, 0, -1)
    names = [b"gkt.test.before" in body or b"gkt.test.during" in body for body in queue]
    assert len(queue) == 2 and all(names), queue
