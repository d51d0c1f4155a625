"""`python -m services.student` (and `gkt student`): a Celery student worker, restarted whenever it dies.

The worker process holds the model and every running job; if it is killed (out of memory, a crash, a
stray signal) this small parent starts a new one, so the student serves again with nobody at the
keyboard, while the dead worker's jobs are taken over by their leases. SIGTERM and SIGINT are passed
to the worker (Celery's warm shutdown) and end the parent too.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from gkt.keys import STUDENT_QUEUE
from gkt.logs import configure_logging
from services.student.settings import StudentSettings

log = logging.getLogger("gkt.student.supervisor")

_MAX_BACKOFF_S = 30.0
_HEALTHY_AFTER_S = 60.0
"""A worker that ran this long before dying restarts at once (the backoff starts over)."""


def worker_command(*, name: str, log_level: str) -> list[str]:
    """The Celery worker: a threads pool sized by GKT_STUDENT_MAX_BATCH (read by the app itself)."""
    return [
        sys.executable, "-m", "celery", "-A", "services.student.celery_app", "worker",
        "--queues", STUDENT_QUEUE, "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle",
        "--hostname", f"{name}@%h", "--loglevel", log_level,
    ]  # fmt: skip


def supervise(command: list[str], *, metrics_dir: Path | None) -> int:
    """Run `command` until told to stop, starting it again each time it dies; returns its last status."""
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    backoff = 1.0
    while True:
        started = time.monotonic()
        _clear_metrics(metrics_dir)
        child = subprocess.Popen(command)
        status = child.wait()
        if stopping:
            return status
        ran_s = time.monotonic() - started
        backoff = 1.0 if ran_s >= _HEALTHY_AFTER_S else backoff
        log.error(
            "student worker exited; starting a new one",
            extra={"status": status, "pid": child.pid, "ran_s": round(ran_s, 1), "restart_in_s": backoff},
        )
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if stopping:
            return status
        backoff = min(backoff * 2, _MAX_BACKOFF_S)


def _clear_metrics(directory: Path | None) -> None:
    """Start each worker with an empty metrics directory: a dead worker's files (or those of an earlier
    run of a restarted container) must not be summed into the new one's."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gkt student", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--name", default="student", help="Celery node name (the host is appended), default %(default)s"
    )
    args = parser.parse_args(argv)
    settings = StudentSettings()
    configure_logging(level=settings.log_level, service="student")
    log.info("supervising a student worker", extra={"host": socket.gethostname()})
    return supervise(
        worker_command(name=args.name, log_level=settings.log_level),
        metrics_dir=settings.prometheus_multiproc_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
