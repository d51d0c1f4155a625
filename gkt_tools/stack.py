"""A whole GKT Serve stack as local processes: private Redis, teacher, student workers, gateway.

Used by `gkt demo`, `gkt up` / `gkt down` and the end-to-end tests. It stays one module (about 320 lines)
because it is one lifecycle: the detached-stack helpers read the record (`stack.json`) that `Stack.start`
writes, and the start order, readiness checks and stop all act on the same processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gkt.client import DEFAULT_GATEWAY_ADDR
from gkt.connections import connect
from gkt.keys import Keys
from gkt_tools import processes
from gkt_tools.processes import free_port, port_free
from gkt_tools.settings import StackSettings
from gkt_tools.startup import READY, ProgressLines, last_message, worker_phase


class StackError(RuntimeError):
    """The stack did not start: one line naming the process, what it was doing, and its log file."""


@dataclass
class Stack:
    """Start with `start()`, stop with `stop()`; `env` overrides `GKT_*` settings for every process."""

    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    redis_url: str | None = None
    students: int = 1
    gateway_addr: str | None = None
    """Where the gateway serves; None: 127.0.0.1:50051 (or a free port, with `pick_free_ports`)."""
    detach: bool = False
    teacher: bool = True
    """False starts no teacher: a gateway with GKT_GATEWAY_DEGRADED_AFTER_S then answers student-only."""
    teachers: int = 1
    """Teacher workers when `teacher` is true: `teacher`, then `teacher-1`, … (one takes over another's
    batch when it dies)."""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    free_metrics_ports: bool = False
    """Give each process a free /metrics port instead of the configured ones (tests)."""
    metrics_ports: dict[str, int] = field(default_factory=dict)
    """The /metrics port of each process that serves one (teacher, student-0…, gateway), set by start()."""
    pick_free_ports: bool = False
    """A port left to its default (gateway 50051, metrics 9101-9103) that is in use is replaced by a free one;
    without this, or for a port set explicitly, a port in use stops the start with a message naming its
    variable (`gkt up`: two stacks on one machine)."""
    private_redis: bool = False
    """True when start() started Redis itself."""

    def start(self, *, timeout_s: float = 600, progress: bool = False) -> None:
        """Start every process and wait until the stack serves; `progress`: show what each worker does."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        try:
            settings = self._settings()
            self.gateway_addr = self._gateway_address()
            if self.redis_url is None:
                self.redis_url = self._start_redis()
                self.private_redis = True
            env = self._service_env()
            for i in range(self.teachers if self.teacher else 0):
                name = f"teacher-{i}" if i else "teacher"
                port = self._metrics_port(name, settings.teacher_metrics_port, 9102, offset=10 * i)
                teacher_env = {**env, "GKT_TEACHER_METRICS_PORT": str(port)}
                self._spawn(name, [sys.executable, "-m", "services.teacher"], teacher_env)
            for i in range(self.students):
                port = self._metrics_port(f"student-{i}", settings.student_metrics_port, 9103, offset=i)
                self._spawn(f"student-{i}", _student_command(f"student-{i}"), self._student_env(env, i, port))
            port = self._metrics_port("gateway", settings.gateway_metrics_port, 9101)
            gateway_env = {**env, "GKT_GATEWAY_METRICS_PORT": str(port)}
            self._spawn("gateway", [sys.executable, "-m", "services.gateway"], gateway_env)
            self._wait_ready(keys=Keys(settings.key_prefix), timeout_s=timeout_s, progress=progress)
        except BaseException:
            self.stop()
            raise
        if self.detach:
            (self.state_dir / "stack.json").write_text(
                json.dumps(
                    {
                        "pids": {n: p.pid for n, p in self.processes.items()},
                        "gateway": self.gateway_addr,
                        "metrics_ports": self.metrics_ports,
                        # `gkt status` reads it; a Redis of the user's own is theirs to name.
                        "redis": self.redis_url if self.private_redis else None,
                    }
                )
            )

    def stop(self, *, timeout_s: float = 30) -> None:
        """Stop in reverse start order, each before the next (gateway drains first, Redis goes last), even
        after `restart()` started some again."""
        for name in sorted(self.processes, key=_start_order, reverse=True):
            process = self.processes.pop(name)
            processes.terminate(process.pid)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                processes.kill_group(process.pid)
                process.wait()

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send `sig` to one process of the stack (fault injection) and reap it."""
        process = self.processes.pop(name)
        processes.kill_group(process.pid, sig)
        process.wait(timeout=30)

    def restart(self, name: str) -> None:
        """Start a process again with the command and environment it was first started with."""
        command, env = self.commands[name]
        self._spawn(name, command, env)

    def log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def log_path(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def _start_redis(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError("redis-server is not installed (run `make setup`, or set GKT_REDIS_URL)")
        port = free_port()
        # AOF, fsynced every second: a restart keeps every queued job; a machine crash loses about 1 s of writes
        durability = ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", *durability]
        self._spawn("redis", [*command, "--dir", str(self.state_dir)], processes.child_environment())
        url = f"redis://127.0.0.1:{port}/0"
        _wait(
            lambda: connect(url).ping(),
            timeout_s=10,
            stack=self,
            stuck=lambda: f"redis-server does not answer at {url} (log {self.log_path('redis')})",
        )
        return url

    def _settings(self) -> StackSettings:
        """The settings the stack's services will read: `env`'s overrides over this process's environment."""
        overrides: dict[str, Any] = {
            name.removeprefix("GKT_").lower(): value
            for name, value in self.env.items()
            if name.startswith("GKT_")
        }
        return StackSettings(**overrides)

    def _gateway_address(self) -> str:
        explicit = self.gateway_addr
        addr = explicit or DEFAULT_GATEWAY_ADDR
        host, _, port = addr.rpartition(":")
        if port_free(int(port), host=host.strip("[]") or "0.0.0.0"):
            return addr
        if self.pick_free_ports and not explicit:
            return f"{host}:{free_port()}"
        raise StackError(
            f"the gateway's port {port} is in use: set GKT_GATEWAY_ADDR to a free address (e.g. {host}:{free_port()})"
        )

    def _service_env(self) -> dict[str, str]:
        env = processes.child_environment(self.env)
        env["GKT_REDIS_URL"] = self.redis_url or ""
        env["GKT_GATEWAY_ADDR"] = self.gateway_addr or ""
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("GKT_TORCH_THREADS", str(self.torch_threads_each()))
        return env

    def torch_threads_each(self) -> int:
        """Torch threads for each model process when GKT_TORCH_THREADS is not set: the cores this process
        may use, shared among the stack's teachers and students. Torch's default (a thread per core in
        every process) oversubscribes a small machine running them side by side, which slows every
        forward pass several-fold (the bundled student's determinism test beside other work on two cores:
        40 s with one thread, 462 s with torch's two)."""
        models = (self.teachers if self.teacher else 0) + self.students
        return max(1, len(os.sched_getaffinity(0)) // max(1, models))

    def _student_env(self, env: dict[str, str], index: int, metrics_port: int) -> dict[str, str]:
        multiproc = self.state_dir / f"prometheus-student-{index}"
        shutil.rmtree(multiproc, ignore_errors=True)
        multiproc.mkdir(parents=True)
        return {
            **env,
            "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
            "GKT_STUDENT_METRICS_PORT": str(metrics_port),
        }

    def _metrics_port(self, name: str, configured: int | None, default: int, *, offset: int = 0) -> int:
        """A process's metrics port (0 = off; students count up from theirs), recorded in `metrics_ports`.

        A port left to its default that is in use is replaced by a free one with `pick_free_ports`; a port
        set explicitly (in the environment or in `env`) that is in use stops the start.
        """
        port = configured if configured is not None else default
        if port:
            port += offset
        taken = bool(port) and not port_free(port)
        if self.free_metrics_ports or (taken and self.pick_free_ports and configured is None):
            port = free_port()
        elif taken:
            variable = f"GKT_{name.split('-')[0].upper()}_METRICS_PORT"
            raise StackError(
                f"port {port} for the {name}'s metrics is in use: set {variable} to a free port, or 0 for none"
            )
        if port:
            self.metrics_ports[name] = port
        return port

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.commands[name] = (command, env)
        self.processes[name] = processes.spawn(command, env=env, log=self.log_path(name))

    def _wait_ready(self, *, keys: Keys, timeout_s: float, progress: bool) -> None:
        """Until every worker has a heartbeat and the gateway serves; `progress`: a line per worker."""
        redis = connect(self.redis_url or "")
        workers = [name for name in self.processes if name not in ("redis", "gateway")]
        lines = ProgressLines(workers) if progress else None

        def workers_up() -> bool:
            teachers = list(redis.scan_iter(match=keys.heartbeat("teacher", "*")))
            students = list(redis.scan_iter(match=keys.heartbeat("student", "*")))
            up = (len(teachers) >= self.teachers or not self.teacher) and len(students) >= self.students
            if lines is not None:
                lines.show({n: READY if up else worker_phase(self.log(n)) for n in workers})
            return up

        def stuck_workers() -> str:
            phases = {n: worker_phase(self.log(n)) for n in workers}
            waiting = [n for n in workers if phases[n] != READY]
            if not waiting:
                return "the workers logged that they were ready, but no heartbeat of theirs is in Redis"
            return "; ".join(f"{n} was {phases[n]} (log {self.log_path(n)})" for n in waiting)

        _wait(workers_up, timeout_s=timeout_s, stack=self, stuck=stuck_workers)
        _wait(
            lambda: gateway_serving(self.gateway_addr or ""),
            timeout_s=60,
            stack=self,
            stuck=lambda: (
                f"the gateway does not serve at {self.gateway_addr} (log {self.log_path('gateway')})"
            ),
        )


def read_detached(state_dir: Path) -> dict[str, Any] | None:
    """The record of the stack `detach=True` started in `state_dir`, while its gateway runs; else None."""
    record = state_dir / "stack.json"
    try:
        stack: dict[str, Any] = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    gateway = stack.get("pids", {}).get("gateway")
    return stack if gateway and processes.alive(gateway) else None


def gateway_serving(addr: str) -> bool:
    with grpc.insecure_channel(addr) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def stop_detached(state_dir: Path, *, timeout_s: float = 30) -> list[str]:
    """Stop a stack started with `detach=True`; returns the names of the processes it stopped."""
    record = state_dir / "stack.json"
    if not record.exists():
        return []
    pids: dict[str, int] = json.loads(record.read_text())["pids"]
    for pid in reversed(list(pids.values())):
        processes.stop(pid, timeout_s=timeout_s)
    record.unlink()
    return list(pids)


def _start_order(name: str) -> int:
    """Where a process comes in the order `start()` starts them."""
    return {"redis": 0, "gateway": 3}.get(name, 1 if name.startswith("teacher") else 2)


def _student_command(name: str) -> list[str]:
    """A student worker under its restarting parent (`python -m services.student`)."""
    return [sys.executable, "-m", "services.student", "--name", name]


def _wait(check: Callable[[], object], *, timeout_s: float, stack: Stack, stuck: Callable[[], str]) -> None:
    """Until `check()` is true; a process of the stack that exits, or the deadline, is one StackError line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, process in stack.processes.items():
            if process.poll() is not None:
                log = stack.log(name)
                doing = "starting" if name in ("redis", "gateway") else worker_phase(log)
                raise StackError(
                    f"{name} exited with status {process.returncode} while {doing}: "
                    f"{last_message(log) or 'no message'} (log {stack.log_path(name)})"
                )
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.2)
    raise StackError(f"not ready after {timeout_s:.0f} s: {stuck()}")
