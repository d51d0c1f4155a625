"""A Redis Sentinel group on loopback: a master, a replica and three sentinels on free ports, each a
process of its own that a test or `gkt chaos` can kill (the master, to force a failover) and start again."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis

from gkt_tools.processes import free_port

SENTINELS = 3
QUORUM = 2
DOWN_AFTER_MS = 1000
"""How long the master must be silent before a sentinel believes it down (Sentinel's default: 30 s)."""
FAILOVER_TIMEOUT_MS = 10_000


@dataclass
class SentinelGroup:
    """`start()`, then give `url` to the stack; `kill_master()` SIGKILLs the master, `wait_failover()` waits
    until the sentinels name another, `restart()` starts a killed node again (it rejoins as a replica)."""

    workdir: Path
    master_name: str = "gkt"
    down_after_ms: int = DOWN_AFTER_MS
    ports: dict[str, int] = field(default_factory=dict)
    """Each node's port: `redis-a`, `redis-b` (the replica at the start), `sentinel-0`…"""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{self.ports[f'sentinel-{i}']}" for i in range(SENTINELS))
        return f"redis+sentinel://{hosts}/{self.master_name}/0"

    def start(self, *, timeout_s: float = 30) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in ("redis-a", "redis-b", *(f"sentinel-{i}" for i in range(SENTINELS))):
            self.ports[name] = free_port()
        try:
            self._start_redis("redis-a")
            self._start_redis("redis-b", replica_of=self.ports["redis-a"])
            for i in range(SENTINELS):
                self._start_sentinel(f"sentinel-{i}")
            self._until(self._ready, timeout_s=timeout_s, what="the master, its replica and every sentinel")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for name in list(self.processes):
            process = self.processes.pop(name)
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def master(self) -> str:
        """The node the sentinels name as master now."""
        port = int(self._ask("sentinel", "get-master-addr-by-name", self.master_name)[1])
        return next(name for name, known in self.ports.items() if known == port)

    def kill_master(self) -> str:
        """SIGKILL the master (no shutdown, no last write to disk); returns its name."""
        name = self.master()
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        return name

    def wait_failover(self, old: str, *, timeout_s: float = 60) -> str:
        """Until the sentinels name a master other than `old` and it accepts writes; returns its name."""
        self._until(lambda: self.master() != old and self._writable(self.master()), timeout_s=timeout_s,
                    what=f"the sentinels to promote a replica in place of {old}")  # fmt: skip
        return self.master()

    def restart(self, name: str, *, timeout_s: float = 30) -> None:
        """Start a killed Redis node again; the sentinels make it a replica of the current master."""
        self._start_redis(name)
        self._until(
            lambda: self._is_replica(name), timeout_s=timeout_s, what=f"{name} to rejoin as a replica"
        )

    def replica_offsets(self) -> tuple[int, int]:
        """(master's replication offset, the replica's acknowledged offset): equal when nothing is in flight."""
        info = self._client(self.master()).info("replication")
        replica = info.get("slave0", {})
        return int(info["master_repl_offset"]), int(replica.get("offset", 0)) if replica else 0

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def _start_redis(self, name: str, *, replica_of: int | None = None) -> None:
        binary = _binary("redis-server")
        data = self.workdir / name
        data.mkdir(exist_ok=True)
        args = [binary, "--port", str(self.ports[name]), "--bind", "127.0.0.1", "--dir", str(data),
                "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]  # fmt: skip
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self._spawn(name, args)

    def _start_sentinel(self, name: str) -> None:
        config = self.workdir / f"{name}.conf"  # Sentinel rewrites its file as it learns the group
        config.write_text(
            f"port {self.ports[name]}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"sentinel monitor {self.master_name} 127.0.0.1 {self.ports['redis-a']} {QUORUM}\n"
            f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.master_name} {FAILOVER_TIMEOUT_MS}\n"
        )
        self._spawn(name, [_binary("redis-sentinel"), str(config)])

    def _spawn(self, name: str, args: list[str]) -> None:
        log = self.log_path(name).open("ab")
        self.processes[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def _ready(self) -> bool:
        if self._client("redis-b").info("replication").get("master_link_status") != "up":
            return False
        for i in range(SENTINELS):
            state: Any = self._client(f"sentinel-{i}").sentinel_master(self.master_name)
            if state["num-other-sentinels"] < SENTINELS - 1 or state["num-slaves"] < 1:
                return False
        return True

    def _writable(self, name: str) -> bool:
        return self._client(name).info("replication").get("role") == "master"

    def _is_replica(self, name: str) -> bool:
        return self._client(name).info("replication").get("master_link_status") == "up"

    def _ask(self, *command: str) -> list[str]:
        for i in range(SENTINELS):
            with contextlib.suppress(Exception):
                reply = self._client(f"sentinel-{i}").execute_command(*command)
                if reply:
                    return [part.decode() if isinstance(part, bytes) else str(part) for part in reply]
        raise RuntimeError(f"no sentinel answered {' '.join(command)}")

    def _client(self, name: str) -> Redis:
        return Redis(port=self.ports[name], socket_timeout=2, socket_connect_timeout=2)

    @staticmethod
    def _until(check: object, *, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(Exception):
                if check():  # type: ignore[operator]
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.1)


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(
            f"{name} is not installed: run `make setup` (scripts/ensure-redis.sh installs it)"
        )
    return path
