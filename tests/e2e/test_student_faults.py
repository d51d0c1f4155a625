"""No student job is lost, with the bundled models: a killed worker process, a killed worker, Redis
restarting during jobs; and an idle student stays visible. Each fault is the `gkt chaos` scenario of the
same name (gkt_tools.scenarios), on JOBS calls: answered, failed by status, lost (no reply before the
deadline) and duplicated (more than one final event) are counted the same way."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from gkt.connections import connect, outlasting
from gkt.keys import Keys
from gkt.liveness import parse_heartbeat
from gkt_tools import faults, scenarios
from gkt_tools.load import Tally
from gkt_tools.processes import free_port
from gkt_tools.stack import Stack
from tests.e2e.conftest import TINY_STACK_ENV

pytestmark = pytest.mark.real_models

JOBS = 8
RECOVERY_S = 30.0
KEYS = Keys("sfaults")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The bundled teacher and two bundled students, each worker under its restarting parent, on the
    stack's own Redis (append-only file, fsync every second)."""
    stack = Stack(
        state_dir=tmp_path_factory.mktemp("student-faults"),
        env={**TINY_STACK_ENV, "GKT_KEY_PREFIX": KEYS.prefix, "GKT_STUDENT_WARMUP": "true"},
        students=2,
        gateway_addr=f"127.0.0.1:{free_port()}",
    )
    stack.start(timeout_s=900)  # a fresh machine converts both GGUF files first
    yield stack
    stack.stop()


@pytest.fixture
def target(stack: Stack) -> scenarios.Target:
    target = scenarios.Target(
        stack=stack,
        redis=connect(stack.redis_url or "", retry=outlasting(30)),
        keys=KEYS,
        request=lambda index: scenarios.request(index, max_new_tokens=48),
        calls=JOBS,
        deadline_s=300,
    )
    scenarios.wait_healthy(target)  # a worker restarted by an earlier test has loaded its model
    return target


def test_a_killed_worker_process_loses_nothing_and_its_student_serves_again(target: scenarios.Target) -> None:
    row = scenarios.pool_process(target)

    assert row.tally == Tally(sent=JOBS, answered=JOBS)  # nothing failed, lost or answered twice
    assert row.recovery_s is not None and row.recovery_s <= RECOVERY_S
    assert row.worker_restarts == 1
    # the parent started a new worker, which loaded the model and says it is alive: no restart by hand
    faults.wait_until(
        lambda: faults.all_workers_alive(target.stack, target.redis, keys=KEYS),
        timeout_s=180,
        what="the new worker's heartbeat",
    )


def test_a_killed_worker_loses_nothing_another_student_takes_its_jobs_over(target: scenarios.Target) -> None:
    row = scenarios.worker(target)  # the parent and the worker: restarted by the scenario once counted

    assert row.tally == Tally(sent=JOBS, answered=JOBS)
    assert row.recovery_s is not None and row.recovery_s <= RECOVERY_S
    assert any("sending it again" in target.stack.log(name) for name in faults.student_names(target.stack))


def test_jobs_running_while_redis_restarts_are_answered_or_unavailable_and_no_model_reloads(
    target: scenarios.Target,
) -> None:
    row = scenarios.redis_restart(target)

    assert row.tally.lost == 0 and row.tally.duplicated == 0
    assert row.tally.answered + row.tally.failed["UNAVAILABLE"] == JOBS, row.tally
    assert row.worker_restarts == 0  # the workers outlived the broker connection: no model loaded again
    # the students finished the jobs they held and published them once Redis was back
    faults.wait_until(
        lambda: target.redis.hlen(KEYS.student_running) == 0, timeout_s=120, what="the students' jobs to end"
    )


def test_an_idle_student_keeps_its_heartbeat_fresh(target: scenarios.Target) -> None:
    stack, redis = target.stack, target.redis
    beats = [KEYS.heartbeat("student", f"{socket.gethostname()}-{faults.worker_pid(stack, 'student-0')}")]

    def at(key: str) -> float:
        value = redis.get(key)
        return parse_heartbeat(value)[0] if value else 0.0

    faults.wait_until(lambda: all(at(key) for key in beats), timeout_s=180, what="the student's heartbeat")
    first = [at(key) for key in beats]
    faults.wait_until(
        lambda: all(at(k) > f for k, f in zip(beats, first, strict=True)),
        timeout_s=20,
        what="an idle student's next heartbeat",
    )
