"""Faults to inject into a running local stack, and what to look at to choose the moment: which student
worker holds jobs now, whether the teacher holds a batch, whether every worker of the stack is back."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis import Redis

from gkt.keys import TEACHER_GROUP, Keys
from gkt_tools.stack import Stack


def worker_pid(stack: Stack, name: str) -> int | None:
    """The Celery worker process under a student's restarting parent (where the model and the jobs live);
    None while the parent starts a new one."""
    parent = stack.processes[name].pid
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def jobs_held_by(redis: Redis, *, keys: Keys, pid: int) -> int:
    """Jobs whose lease a worker process holds now."""
    owner = f"{socket.gethostname()}-{pid}:"
    holders: list[Any] = [redis.get(key) for key in redis.scan_iter(match=keys.job_lease("*"), count=1000)]
    return sum(1 for holder in holders if holder and bytes(holder).decode().startswith(owner))


def student_holding_jobs(stack: Stack, redis: Redis, *, keys: Keys) -> str | None:
    """A student (by its name in the stack) whose worker holds a running job now, else None."""
    for name in student_names(stack):
        pid = worker_pid(stack, name)
        if pid is not None and jobs_held_by(redis, keys=keys, pid=pid):
            return name
    return None


def student_names(stack: Stack) -> list[str]:
    return [name for name in stack.processes if name.startswith("student-")]


def teacher_names(stack: Stack) -> list[str]:
    return [name for name in stack.processes if name.startswith("teacher")]


def teacher_holding_a_batch(stack: Stack, redis: Redis, *, keys: Keys) -> str | None:
    """A teacher (by its name in the stack) that has read jobs it has not acknowledged yet (a batch being
    generated), else None."""
    consumers: Any = redis.xinfo_consumers(keys.queries, TEACHER_GROUP)
    holders = {_text(c["name"]) for c in consumers if int(c["pending"]) > 0}
    host = socket.gethostname()
    for name in teacher_names(stack):
        if f"{host}-{stack.processes[name].pid}" in holders:
            return name
    return None


def kill_worker_process(stack: Stack, name: str) -> int:
    """SIGKILL a student's Celery worker process (its parent starts a new one); returns its pid."""
    pid = worker_pid(stack, name)
    if pid is None:
        raise RuntimeError(f"{name} has no worker process to kill")
    os.kill(pid, signal.SIGKILL)
    return pid


def terminate(stack: Stack, name: str) -> subprocess.Popen[bytes]:
    """SIGTERM a process of the stack without waiting for it (a gateway then drains its calls)."""
    process = stack.processes[name]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    return process


def all_workers_alive(stack: Stack, redis: Redis, *, keys: Keys) -> bool:
    """Every process of the stack runs, and each worker (the teacher, each student's worker process) has
    written its heartbeat: a restarted one has loaded its model."""
    return not workers_not_alive(stack, redis, keys=keys)


def workers_not_alive(stack: Stack, redis: Redis, *, keys: Keys) -> list[str]:
    """What keeps `all_workers_alive` false, one line per process: exited (with its status), no worker
    process under a student's parent, or no heartbeat."""
    host = socket.gethostname()
    problems = [
        f"{name} exited with status {process.returncode}"
        for name, process in stack.processes.items()
        if process.poll() is not None
    ]
    beats = {
        name: keys.heartbeat("teacher", f"{host}-{stack.processes[name].pid}")
        for name in teacher_names(stack)
    }
    for name in student_names(stack):
        pid = worker_pid(stack, name)
        if pid is None:
            problems.append(f"{name} has no worker process")
        else:
            beats[name] = keys.heartbeat("student", f"{host}-{pid}")
    problems += [f"{name} has no heartbeat ({key})" for name, key in beats.items() if not redis.exists(key)]
    return problems


def wait_until(check: Callable[[], object], *, timeout_s: float, what: str, every_s: float = 0.02) -> None:
    """Until `check()` is true (an exception counts as not yet); TimeoutError naming `what` after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
