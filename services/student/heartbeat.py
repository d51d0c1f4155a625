"""A student process's heartbeat, rewritten by a timer thread: an idle student stays visible."""

from __future__ import annotations

import contextlib
import logging
import threading

from redis import Redis
from redis.exceptions import RedisError

from gkt.liveness import HEARTBEAT_EVERY_S, HEARTBEAT_TTL_S, write_heartbeat

log = logging.getLogger(__name__)


class Heartbeat:
    """Writes `key` every `every_s` seconds from a daemon thread, with how many jobs run now, and at once
    when that changes (from the thread too: a job never waits for the write)."""

    def __init__(
        self, *, redis: Redis, key: str, capacity: int = 1, every_s: float = HEARTBEAT_EVERY_S
    ) -> None:
        self.redis = redis
        self.key = key
        self.capacity = capacity
        self.busy = 0
        self._every_s = every_s
        self._stopping = threading.Event()
        self._changed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gkt-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def job_started(self) -> None:
        self.busy += 1
        self._changed.set()

    def job_finished(self) -> None:
        self.busy -= 1
        self._changed.set()

    def stop(self) -> None:
        """Stop beating and remove the key, so the student is gone from the status at once."""
        self._stopping.set()
        self._changed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)  # a beat in flight must not land after the delete
        with contextlib.suppress(RedisError):
            self.redis.delete(self.key)

    def beat(self) -> None:
        write_heartbeat(
            self.redis, key=self.key, ttl_s=HEARTBEAT_TTL_S, busy=self.busy, capacity=self.capacity
        )

    def _run(self) -> None:
        while True:
            self._changed.wait(self._every_s)
            self._changed.clear()
            if self._stopping.is_set():
                return
            try:
                self.beat()
            except RedisError as exc:  # Redis is away: the next beat tries again
                log.warning("heartbeat not written", extra={"error": str(exc)})
