"""Local processes: free ports, a child's environment, starting a child in its own session, stopping it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(port: int, *, host: str = "0.0.0.0") -> bool:
    """True when nothing listens on `port` (a socket lingering after a close does not count)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def child_environment(overrides: Mapping[str, str] = {}) -> dict[str, str]:
    """The environment a child process starts with: this process's own, as a child inherits it, with
    `overrides` on top. The child reads its settings from it through its own settings classes; nothing
    here interprets a variable."""
    return {**os.environ, **overrides}


def spawn(command: list[str], *, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start `command` in a session of its own (so its children stop with it), its output appended to `log`."""
    with log.open("ab") as output:
        return subprocess.Popen(
            command,
            env=dict(env),
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop(pid: int, *, timeout_s: float) -> None:
    """SIGTERM the process group of `pid`, waiting up to `timeout_s` for it to go, then SIGKILL it."""
    terminate(pid)
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        kill_group(pid)


def terminate(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)


def kill_group(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
