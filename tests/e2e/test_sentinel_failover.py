"""A whole stack on a Redis Sentinel group, its master SIGKILLed under load: nothing lost, nothing answered
twice, every failure a clear UNAVAILABLE, and the stack serving again on the promoted replica.

Real processes: a master, a replica and three redis-sentinel processes on loopback, the echo teacher, two
Celery students and the gateway, all given the group's redis+sentinel:// URL.
"""

from __future__ import annotations

import threading
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
    addr = stack.gateway_addr or ""
    during = Load(addr, request=_request, deadline_s=60)  # 2 s before the kill, and through the failover
    after = Load(addr, request=_request, deadline_s=60)  # 2 s once every sentinel names the new master
    try:
        for _ in range(8):
            during.send(WAVE)
            time.sleep(WAVE_EVERY_S)
        old = group.kill_master()
        killed_at = time.monotonic()
        failed_over = threading.Thread(target=group.wait_failover, args=(old,))
        failed_over.start()
        while failed_over.is_alive():
            during.send(WAVE)
            time.sleep(WAVE_EVERY_S)
        new = group.master()
        for _ in range(8):
            after.send(WAVE)
            time.sleep(WAVE_EVERY_S)
        answered_again = first_answer(addr, _request(0), timeout_s=60, call_timeout_s=10)
        outcomes = {"during": during.wait(timeout_s=120), "after": after.wait(timeout_s=120)}
    finally:
        during.close()
        after.close()

    redis = connect(group.url, retry=outlasting(10))
    counted = {phase: tally(found, redis=redis, keys=KEYS) for phase, found in outcomes.items()}
    for phase, each in counted.items():
        print(
            f"\nsentinel failover, {phase}: sent {each.sent}, answered {each.answered}, failed "
            f"{each.failed_text()}, lost {each.lost}, duplicated {each.duplicated}"
        )
    print(f"answering again {answered_again - killed_at if answered_again else None:.1f} s after the kill")
    for each in counted.values():
        assert each.lost == 0
        assert each.duplicated == 0
        assert set(each.failed) <= {"UNAVAILABLE"}, each.failed
    assert counted["during"].answered > 0 and counted["after"].answered > 0
    assert answered_again is not None and answered_again - killed_at < 30
    assert new != old
    group.restart(old)  # the old master rejoins as a replica of the new one
    assert group.master() == new
