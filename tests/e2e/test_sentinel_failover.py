"""A whole stack on a Redis Sentinel group, its master SIGKILLed under load: nothing lost, nothing answered
twice, every failure a clear UNAVAILABLE, and the stack serving again on the promoted replica.

Real processes: a master, a replica and three redis-sentinel processes on loopback, the echo teacher, two
Celery students and the gateway, all given the group's redis+sentinel:// URL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gkt.connections import connect, outlasting
from gkt.keys import Keys
from gkt.v1 import guidance_pb2 as pb
from gkt_tools.load import Load, first_answer, tally
from gkt_tools.processes import free_port
from gkt_tools.sentinel import SentinelGroup
from gkt_tools.stack import Stack

KEYS = Keys("failover")
WAVE = 20
WAVE_EVERY_S = 0.25
ECHO_ENV = {
    "GKT_TEACHER_BACKEND": "echo-benchmark-only",
    "GKT_STUDENT_MODEL": "echo-benchmark-only",
    "GKT_STUDENT_WARMUP": "false",
    "GKT_TEACHER_MAX_WAIT_MS": "5",
    "GKT_KEY_PREFIX": KEYS.prefix,
    "GKT_GATEWAY_KEY_MAX_QUEUED": "0",
    "GKT_GATEWAY_METRICS_PORT": "0",
    "GKT_TEACHER_METRICS_PORT": "0",
    "GKT_STUDENT_METRICS_PORT": "0",
}


def _request(index: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        query=f"Question {index}?",
        guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=4),
        sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=8, seed=1),
    )


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path_factory.mktemp("sentinel"))
    group.start()
    yield group
    group.stop()


@pytest.fixture(scope="module")
def stack(group: SentinelGroup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        state_dir=Path(tmp_path_factory.mktemp("failover-stack")),
        env=ECHO_ENV,
        redis_url=group.url,
        students=2,
        gateway_addr=f"127.0.0.1:{free_port()}",
    )
    stack.start(timeout_s=180)
    yield stack
    stack.stop()


def test_a_master_killed_under_load_loses_nothing_and_the_stack_follows_the_new_master(
    group: SentinelGroup, stack: Stack
) -> None:
    load = Load(stack.gateway_addr or "", request=_request, deadline_s=60)
    try:
        for _ in range(8):  # 2 s of load before the kill
            load.send(WAVE)
            time.sleep(WAVE_EVERY_S)
        old = group.kill_master()
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < 8:  # and 8 s after it, through the failover
            load.send(WAVE)
            time.sleep(WAVE_EVERY_S)
        new = group.wait_failover(old)
        answered_again = first_answer(stack.gateway_addr or "", _request(0), timeout_s=60, call_timeout_s=10)
        outcomes = load.wait(timeout_s=120)
    finally:
        load.close()

    redis = connect(group.url, retry=outlasting(10))
    counted = tally(outcomes, redis=redis, keys=KEYS)
    print(
        f"\nsentinel failover: sent {counted.sent}, answered {counted.answered}, failed {counted.failed_text()}, "
        f"lost {counted.lost}, duplicated {counted.duplicated}; "
        f"answering again {answered_again - killed_at if answered_again else None:.1f} s after the kill"
    )
    assert counted.lost == 0
    assert counted.duplicated == 0
    assert set(counted.failed) <= {"UNAVAILABLE"}, counted.failed
    # calls before the kill and after the failover were answered, and the stack answers on the new master
    answered_after = [o for o in outcomes if o.status == "OK" and o.ended_at > killed_at + 8]
    assert counted.answered > 0 and answered_after
    assert answered_again is not None and answered_again - killed_at < 30
    assert new != old
    group.restart(old)  # the old master rejoins as a replica of the new one
    assert group.master() == new
