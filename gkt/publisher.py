"""The student side of a job's event stream: a synchronous publisher for Celery task threads, which hears
cancellations on a pub/sub channel so that checking for one between two tokens costs no round trip."""

from __future__ import annotations

import logging
import time
from typing import Any

from redis import Redis

from gkt.jobs import DeltaEvent, ErrorEvent, FinalEvent, Job, encode_event
from gkt.keys import Keys
from gkt.queue import EVENTS_MAXLEN, AnyEvent, add_dead_letter, add_final

log = logging.getLogger(__name__)

_HEARD_MAX = 10_000


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _log_listener_error(exc: BaseException, pubsub: Any, thread: Any) -> None:
    """Keep listening through a Redis outage (redis-py reconnects on the next read)."""
    log.warning("cancellation listener: %s", exc)
    time.sleep(1.0)


class SyncEventPublisher:
    """The student side: publishes a job's events from a synchronous Celery task."""

    def __init__(self, redis: Redis, *, keys: Keys, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self._heard: dict[str, None] = {}  # cancelled job ids heard on the channel, oldest first
        self._listener: Any = None

    def watch_cancellations(self) -> None:
        """Listen for cancellations in a background thread, so that checking one between two tokens
        costs no Redis round trip (`heard_cancel`). The durable key is still read at every publish, so
        a cancellation missed here (sent before the subscription, or while Redis was away) still stops
        the job at the next delta."""
        if self._listener is not None:
            return
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(**{self.keys.cancellations: self._on_cancel})
        self._listener = pubsub.run_in_thread(
            sleep_time=1.0, daemon=True, exception_handler=_log_listener_error
        )

    def stop_watching(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    def heard_cancel(self, job_id: str) -> bool:
        return job_id in self._heard

    def _on_cancel(self, message: dict[str, Any]) -> None:
        self._heard[_text(message["data"])] = None
        while len(self._heard) > _HEARD_MAX:
            del self._heard[next(iter(self._heard))]

    def publish(self, job_id: str, event: AnyEvent, *, check_cancel: bool = False) -> bool:
        """Publish an event; returns True when the job was cancelled (checked in the same round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(
            self.keys.events(job_id), {"e": encode_event(event)}, maxlen=EVENTS_MAXLEN, approximate=True
        )
        pipe.expire(self.keys.events(job_id), self.ttl_s)
        if check_cancel:
            pipe.exists(self.keys.cancelled(job_id))
        replies: list[Any] = pipe.execute()
        return bool(check_cancel and replies[-1])

    def cancelled(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys.cancelled(job_id)))

    def begin(self, job_id: str) -> tuple[bool, int]:
        """Whether the job is answered already, and this delivery's number (redeliveries after a worker
        died included), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.keys.final(job_id))
        pipe.incr(self.keys.attempts(job_id))
        pipe.expire(self.keys.attempts(job_id), self.ttl_s)
        finished, attempt, _ = pipe.execute()
        return bool(finished), int(attempt)

    def publish_final(
        self, job_id: str, event: FinalEvent | ErrorEvent, *, after: DeltaEvent | None = None
    ) -> bool:
        """Publish a job's last event unless it has one; True if this call did. `after`: the job's last
        delta, published just before it in the same round trip."""
        pipe = self.redis.pipeline(transaction=False)
        if after is not None:
            pipe.xadd(
                self.keys.events(job_id), {"e": encode_event(after)}, maxlen=EVENTS_MAXLEN, approximate=True
            )
        add_final(pipe, keys=self.keys, job_id=job_id, event=event, ttl_s=self.ttl_s)
        return bool(pipe.execute()[-1])

    def dead_letter(self, job: Job, *, reason: str) -> None:
        """Keep a job that keeps failing for inspection."""
        pipe = self.redis.pipeline(transaction=False)
        add_dead_letter(pipe, keys=self.keys, job=job, reason=reason)
        pipe.execute()
