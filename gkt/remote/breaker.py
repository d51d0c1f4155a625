"""The circuit breaker of a remote server: opens after N consecutive server failures, then lets one
probe through every `reset_after_s`."""

from __future__ import annotations

import logging
import time
from typing import Literal

log = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Opens after N consecutive server failures, then lets one probe through every `reset_after_s`."""

    def __init__(
        self, *, failure_threshold: int, reset_after_s: float, name: str = "inference server"
    ) -> None:
        self._name = name
        self._threshold = failure_threshold
        self._reset_after_s = reset_after_s
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        return "open" if time.monotonic() - self._opened_at < self._reset_after_s else "half_open"

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_in_s(self) -> float:
        """Time until the next probe is allowed (0 when closed or half-open)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._reset_after_s - (time.monotonic() - self._opened_at))

    def allows(self) -> bool:
        """Whether a request could be sent now (no side effect: use before queueing)."""
        state = self.state
        return state == "closed" or (state == "half_open" and not self._probe_in_flight)

    def acquire(self) -> bool:
        """Claim the right to send one request now; in half-open state only one probe at a time gets it."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        """The server answered (even with a client error): close the breaker."""
        if self._opened_at is not None:
            log.info("%s: circuit closed", self._name, extra={"backend": self._name})
        self._failures = 0
        self._opened_at = None
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._probe_in_flight or (self._opened_at is None and self._failures >= self._threshold):
            if self._opened_at is None:
                log.warning(
                    "%s: circuit opened, failing its jobs fast",
                    self._name,
                    extra={"backend": self._name, "failures": self._failures, "reset_s": self._reset_after_s},
                )
            self._opened_at = time.monotonic()
        self._probe_in_flight = False

    def abandon(self) -> None:
        """An attempt ended without a verdict (cancelled): free the probe slot, change nothing else."""
        self._probe_in_flight = False
