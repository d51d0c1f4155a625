"""The fault matrix of `gkt chaos`: each scenario sends calls at a running stack, breaks one thing while
they run, and reports what the calls came to and how long the stack took to answer again.

Seconds to recover count from the fault until a fresh call is answered and every call in flight at the
fault has its outcome. Each scenario leaves the stack whole again for the next one (a killed worker is
started again, and the next scenario waits until every worker has loaded its model).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from redis import Redis

from gkt.keys import Keys
from gkt.v1 import guidance_pb2 as pb
from gkt_tools import faults
from gkt_tools.load import ANSWERED, Load, MakeRequest, Tally, first_answer, tally
from gkt_tools.sentinel import SentinelGroup
from gkt_tools.stack import Stack

TRIGGER_TIMEOUT_S = 300.0
"""How long a scenario waits for its moment (a job running on a student, a batch held by the teacher)."""
RECOVERY_TIMEOUT_S = 180.0
HEALTHY_TIMEOUT_S = 300.0
BURST = 500
BURST_TOKENS = 8
BURST_DEADLINE_S = 900.0
PROBE_TOKENS = 4
RESTARTED = "student worker exited; starting a new one"
"""What a student's parent logs when it starts a new worker (`services.student.__main__`)."""
REDIS_AWAY_S = 2.0
"""How long Redis stays down in a restart."""


@dataclass
class Target:
    """A running stack and how to load it."""

    stack: Stack
    redis: Redis
    keys: Keys
    request: MakeRequest
    calls: int
    deadline_s: float
    sentinels: SentinelGroup | None = None
    step: Callable[[str], None] = field(default=lambda _text: None)

    @property
    def addr(self) -> str:
        return self.stack.gateway_addr or ""


@dataclass(frozen=True)
class Retries:
    """Calls that failed with a status, sent again with their request ids: how many, how many answered."""

    sent: int
    answered: int


@dataclass(frozen=True)
class Row:
    scenario: str
    tally: Tally
    recovery_s: float | None
    """None: no fault to recover from, or no answer within RECOVERY_TIMEOUT_S (`recovered` says which)."""
    recovered: bool = True
    worker_restarts: int = 0
    """Student worker processes their parents started again (each loads its model anew)."""
    retries: Retries = field(default_factory=lambda: Retries(sent=0, answered=0))
    """The calls that failed with a status, sent again with their request ids once the stack answered."""


def pool_process(target: Target) -> Row:
    """SIGKILL the Celery worker process of a student while it runs jobs; its parent starts a new one and
    the jobs are taken over by their leases."""
    victim: list[str] = []
    return _under_fault(
        target,
        "pool process killed",
        ready=lambda _load: _choose_student(target, victim),
        what="a job to run on a student",
        fault=lambda: faults.kill_worker_process(target.stack, victim[0]),
    )


def worker(target: Target) -> Row:
    """SIGKILL a whole student (its parent too) while it runs jobs: another student takes them over."""
    victim: list[str] = []
    try:
        return _under_fault(
            target,
            "whole worker killed",
            ready=lambda _load: _choose_student(target, victim),
            what="a job to run on a student",
            fault=lambda: target.stack.kill(victim[0]),
        )
    finally:
        if victim and victim[0] not in target.stack.processes:
            target.stack.restart(victim[0])


def redis_restart(target: Target) -> Row:
    """Restart Redis (a clean shutdown, back after REDIS_AWAY_S) while student jobs run."""

    def restart() -> None:
        target.stack.kill("redis", signal.SIGTERM)
        time.sleep(REDIS_AWAY_S)
        target.stack.restart("redis")

    return _under_fault(
        target,
        "Redis restarted during jobs",
        ready=lambda _load: target.redis.hlen(target.keys.student_running) > 0,
        what="a student job to run",
        fault=restart,
    )


def teacher(target: Target) -> Row:
    """SIGKILL a teacher while it holds a batch: another teacher takes the batch over once the dead one's
    heartbeat expires. With a single teacher, a new one is started at once and takes it over when it has
    loaded its model; with more, the killed one is started again once counted."""
    victim: list[str] = []

    def holding() -> bool:
        name = faults.teacher_holding_a_batch(target.stack, target.redis, keys=target.keys)
        if name is not None:
            victim.append(name)
        return name is not None

    alone = len(faults.teacher_names(target.stack)) == 1
    try:
        return _under_fault(
            target,
            "teacher killed holding a batch",
            ready=lambda _load: holding(),
            what="a teacher to hold a batch",
            fault=lambda: target.stack.kill(victim[0]),
            repair=(lambda: target.stack.restart(victim[0])) if alone else None,
        )
    finally:
        if victim and victim[0] not in target.stack.processes:
            target.stack.restart(victim[0])


def gateway_sigterm(target: Target) -> Row:
    """SIGTERM the gateway while streams are in flight: they finish within its grace, then it exits and a
    new one is started on the same address."""
    stopping: list[subprocess.Popen[bytes]] = []

    def restart_when_gone() -> None:
        stopping[0].wait(timeout=120)
        target.stack.processes.pop("gateway")
        target.stack.restart("gateway")

    return _under_fault(
        target,
        "gateway SIGTERM, streams in flight",
        ready=lambda load: load.streaming > 0,
        what="a stream to be in flight",
        fault=lambda: stopping.append(faults.terminate(target.stack, "gateway")),
        repair=restart_when_gone,
    )


def burst(target: Target) -> Row:
    """BURST calls at once, nothing broken: short ones (BURST_TOKENS new tokens each), given time enough to
    be served one batch after another (BURST_DEADLINE_S), so a call that still meets its deadline is lost."""

    def short(index: int) -> pb.GenerateRequest:
        call = target.request(index)
        call.sampling.max_new_tokens = min(call.sampling.max_new_tokens, BURST_TOKENS)
        return call

    load = Load(target.addr, request=short, deadline_s=max(target.deadline_s, BURST_DEADLINE_S))
    try:
        target.step(f"{BURST} calls")
        load.send(BURST)
        outcomes = load.wait(timeout_s=load.deadline_s + 60)
    finally:
        load.close()
    return Row(f"{BURST} concurrent calls", tally(outcomes, redis=target.redis, keys=target.keys), None)


def sentinel_failover(target: Target) -> Row:
    """SIGKILL the Redis master of a Sentinel group while student jobs run: the sentinels promote the
    replica and every service follows it. The old master rejoins as a replica afterwards."""
    group = target.sentinels
    if group is None:
        raise ValueError("the sentinel failover runs against a stack on a Sentinel group")
    killed: list[str] = []
    row = _under_fault(
        target,
        "Sentinel failover",
        ready=lambda _load: target.redis.hlen(target.keys.student_running) > 0,
        what="a student job to run",
        fault=lambda: killed.append(group.kill_master()),
    )
    target.step("old master rejoins")
    group.restart(killed[0])
    return row


SCENARIOS: dict[str, Callable[[Target], Row]] = {
    "pool-process": pool_process,
    "worker": worker,
    "redis-restart": redis_restart,
    "teacher": teacher,
    "gateway-sigterm": gateway_sigterm,
    "burst": burst,
    "sentinel-failover": sentinel_failover,
}
"""Every scenario by its name on the command line, in the order the matrix runs them."""


def request(index: int, *, max_new_tokens: int) -> pb.GenerateRequest:
    """The call the scenarios send: a short free-form question, a few guidance tokens, seeded sampling."""
    return pb.GenerateRequest(
        query=f"Tom has {index % 50 + 3} boxes with 4 apples in each box. How many apples does Tom have?",
        task=pb.TASK_FREEFORM,
        guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=4),
        sampling=pb.SamplingParams(temperature=0.8, max_new_tokens=max_new_tokens, seed=index + 1),
    )


def wait_healthy(target: Target) -> None:
    """Until every worker of the stack is up (a restarted one has loaded its model) and a call is answered."""
    target.step("waiting for the stack")
    try:
        faults.wait_until(
            lambda: faults.all_workers_alive(target.stack, target.redis, keys=target.keys),
            timeout_s=HEALTHY_TIMEOUT_S,
            what="every worker of the stack to be up",
            every_s=0.5,
        )
    except TimeoutError as exc:
        problems = faults.workers_not_alive(target.stack, target.redis, keys=target.keys)
        raise TimeoutError(f"{exc}: {'; '.join(problems)}\n{_log_tails(target.stack, problems)}") from None
    if _answer_again(target) is None:
        raise TimeoutError(f"the stack answered no call within {RECOVERY_TIMEOUT_S:.0f} s")


def _log_tails(stack: Stack, problems: list[str], *, lines: int = 20) -> str:
    """The last `lines` of the log of each process named at the start of a problem line."""
    names = sorted({problem.split()[0] for problem in problems} & set(stack.processes))
    return "\n".join(
        f"--- {name} log, last {lines} lines ---\n" + "\n".join(stack.log(name).splitlines()[-lines:])
        for name in names
    )


def _under_fault(
    target: Target,
    name: str,
    *,
    ready: Callable[[Load], object],
    what: str,
    fault: Callable[[], object],
    repair: Callable[[], None] | None = None,
) -> Row:
    restarts_before = worker_restarts(target.stack)
    with _load(target) as load:
        target.step("sending")
        load.send(target.calls)

        faults.wait_until(
            lambda: load.ended() == target.calls or ready(load), timeout_s=TRIGGER_TIMEOUT_S, what=what
        )
        if load.ended() == target.calls:
            raise RuntimeError(f"every call ended before {what}: send longer jobs (--max-new-tokens)")
        target.step("fault")
        fault_at = time.monotonic()
        fault()
        if repair is not None:
            target.step("repair")
            repair()
        target.step("recovering")
        answered_at = _answer_again(target)
        outcomes = load.wait(timeout_s=target.deadline_s + 60)
        target.step("retrying")
        retried = load.retry(outcomes) if answered_at is not None else []
    counted = tally(outcomes, redis=target.redis, keys=target.keys, retried=retried)
    restarts = worker_restarts(target.stack) - restarts_before
    retries = Retries(sent=len(retried), answered=sum(1 for o in retried if o.status == ANSWERED))
    if answered_at is None:
        return Row(name, counted, None, recovered=False, worker_restarts=restarts, retries=retries)
    recovery_s = max(answered_at, *(o.ended_at for o in outcomes)) - fault_at
    return Row(name, counted, recovery_s, worker_restarts=restarts, retries=retries)


def worker_restarts(stack: Stack) -> int:
    """How many times the students' parents have started a dead worker process again (from their logs)."""
    return sum(stack.log(f"student-{i}").count(RESTARTED) for i in range(stack.students))


def _answer_again(target: Target) -> float | None:
    request = pb.GenerateRequest()
    request.CopyFrom(target.request(0))
    request.sampling.max_new_tokens = PROBE_TOKENS  # the stack serving again, not a long job, is measured
    return first_answer(
        target.addr, request, timeout_s=RECOVERY_TIMEOUT_S, call_timeout_s=min(60.0, target.deadline_s)
    )


def _choose_student(target: Target, chosen: list[str]) -> bool:
    name = faults.student_holding_jobs(target.stack, target.redis, keys=target.keys)
    if name is not None:
        chosen.append(name)
    return name is not None


@contextlib.contextmanager
def _load(target: Target) -> Iterator[Load]:
    load = Load(target.addr, request=target.request, deadline_s=target.deadline_s)
    try:
        yield load
    finally:
        load.close()
