"""A whole GKT Serve stack as local processes: private Redis, teacher, student workers, gateway.

Used by `gkt demo`, `gkt up` / `gkt down` and the end-to-end tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis import Redis

from gkt.queue import Keys


class StackError(RuntimeError):
    """A process of the stack failed to start; the message includes the tail of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """Start with `start()`, stop with `stop()`; `env` overrides `GKT_*` settings for every process."""

    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    redis_url: str | None = None
    students: int = 1
    gateway_addr: str | None = None
    detach: bool = False
    teacher: bool = True
    """False starts no teacher: a gateway with GKT_GATEWAY_DEGRADED_AFTER_S then answers student-only."""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    free_metrics_ports: bool = False
    """Give each process a free /metrics port instead of the configured ones (tests)."""
    metrics_ports: dict[str, int] = field(default_factory=dict)
    """The /metrics port of each process that serves one (teacher, student-0…, gateway), set by start()."""

    def start(self, *, timeout_s: float = 600) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        try:
            if self.redis_url is None:
                self.redis_url = self._start_redis()
            self.gateway_addr = self.gateway_addr or os.environ.get("GKT_GATEWAY_ADDR") or "127.0.0.1:50051"
            env = self._service_env()
            if self.teacher:
                teacher_env = self._metrics_env(env, "teacher", "GKT_TEACHER_METRICS_PORT", 9102)
                self._spawn("teacher", [sys.executable, "-m", "services.teacher"], teacher_env)
            for i in range(self.students):
                self._spawn(f"student-{i}", _student_command(f"student-{i}"), self._student_env(env, i))
            gateway_env = self._metrics_env(env, "gateway", "GKT_GATEWAY_METRICS_PORT", 9101)
            self._spawn("gateway", [sys.executable, "-m", "services.gateway"], gateway_env)
            self._wait_ready(timeout_s=timeout_s)
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
                    }
                )
            )

    def stop(self, *, timeout_s: float = 30) -> None:
        """Stop in reverse start order, each before the next (gateway drains first, Redis goes last)."""
        for name in reversed(list(self.processes)):
            process = self.processes.pop(name)
            _terminate(process.pid)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(process.pid)
                process.wait()

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send `sig` to one process of the stack (fault injection) and reap it."""
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        process.wait(timeout=30)

    def restart(self, name: str) -> None:
        """Start a process again with the command and environment it was first started with."""
        command, env = self.commands[name]
        self._spawn(name, command, env)

    def log(self, name: str) -> str:
        path = self.state_dir / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _start_redis(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError("redis-server is not installed (run `make setup`, or set GKT_REDIS_URL)")
        port = free_port()
        # AOF, fsynced every second: a restart keeps every queued job; a machine crash loses about 1 s of writes
        durability = ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", *durability]
        self._spawn("redis", [*command, "--dir", str(self.state_dir)], dict(os.environ))
        url = f"redis://127.0.0.1:{port}/0"
        _wait(lambda: Redis.from_url(url).ping(), timeout_s=10, what="redis", stack=self, name="redis")
        return url

    def _service_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["GKT_REDIS_URL"] = self.redis_url or ""
        env["GKT_GATEWAY_ADDR"] = self.gateway_addr or ""
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _student_env(self, env: dict[str, str], index: int) -> dict[str, str]:
        student_env = dict(env)
        multiproc = self.state_dir / f"prometheus-student-{index}"
        shutil.rmtree(multiproc, ignore_errors=True)
        multiproc.mkdir(parents=True)
        student_env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
        return self._metrics_env(student_env, f"student-{index}", "GKT_STUDENT_METRICS_PORT", 9103, index)

    def _metrics_env(
        self, env: dict[str, str], name: str, variable: str, default: int, offset: int = 0
    ) -> dict[str, str]:
        """Choose a process's metrics port (0 = off; students count up from theirs) and record it."""
        port = int(env.get(variable, default))
        if port:
            port += offset
        if self.free_metrics_ports:
            port = free_port()
        if port:
            self.metrics_ports[name] = port
        return {**env, variable: str(port)}

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.commands[name] = (command, env)
        log = (self.state_dir / "logs" / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _wait_ready(self, *, timeout_s: float) -> None:
        redis = Redis.from_url(self.redis_url or "")
        keys = Keys(self.env.get("GKT_KEY_PREFIX", os.environ.get("GKT_KEY_PREFIX", "gkt")))

        def workers_up() -> bool:
            teachers = list(redis.scan_iter(match=keys.heartbeat("teacher", "*")))
            students = list(redis.scan_iter(match=keys.heartbeat("student", "*")))
            return (bool(teachers) or not self.teacher) and len(students) >= self.students

        _wait(
            workers_up, timeout_s=timeout_s, what="teacher and student workers (loading models)", stack=self
        )
        _wait(
            lambda: gateway_serving(self.gateway_addr or ""),
            timeout_s=60,
            what="gateway",
            stack=self,
            name="gateway",
        )


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
        _terminate(pid)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            _kill_group(pid)
    record.unlink()
    return list(pids)


def _student_command(name: str) -> list[str]:
    """A student worker under its restarting parent (`python -m services.student`)."""
    return [sys.executable, "-m", "services.student", "--name", name]


def _wait(check: object, *, timeout_s: float, what: str, stack: Stack, name: str | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc_name, process in stack.processes.items():
            if process.poll() is not None:
                raise StackError(
                    f"{proc_name} exited with {process.returncode}:\n{stack.log(proc_name)[-3000:]}"
                )
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.2)
    logs = "\n".join(f"--- {n}\n{stack.log(n)[-2000:]}" for n in ([name] if name else stack.processes))
    raise StackError(f"{what} not ready after {timeout_s:.0f} s\n{logs}")


def _terminate(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
