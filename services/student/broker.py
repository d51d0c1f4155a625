"""The students' Celery broker transport: kombu's Redis (or Sentinel) transport, except that a lost broker
connection leaves the tasks it delivered where they are instead of ending the worker.

When Redis goes away, Celery closes the consumer's connection and kombu tries to hand the tasks the worker
is running back to the queue, on a connection it has already torn down: an AttributeError that ends the
worker process, so its parent starts a new one and the model loads again. Here those tasks keep running;
their entries stay in kombu's `unacked` hash until the visibility timeout sends them again, and a task
whose job is running or answered is then dropped by its claim (`gkt.leases`).
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis

from gkt.connections import sentinel_target

log = logging.getLogger(__name__)


def transport_for(url: str) -> str:
    """Celery's `broker_transport` for the students' Redis URL."""
    name = "SentinelTransport" if sentinel_target(url) else "Transport"
    return f"{__name__}:{name}"


class _QoS(redis.QoS):
    """Acknowledgements of one channel; on a channel whose connection is gone they touch no Redis."""

    def _connection_gone(self) -> bool:
        transport = self.channel.connection  # None once the channel is closed
        return transport is None or transport.client is None

    def restore_unacked(self, client: Any = None) -> Any:
        if self._connection_gone():
            if self._delivered:
                log.warning(
                    "broker connection lost: %d running tasks stay unacknowledged until the visibility "
                    "timeout",
                    len(self._delivered),
                )
            self._delivered.clear()
            return None
        return super().restore_unacked(client)

    def ack(self, delivery_tag: Any) -> None:
        if self._connection_gone():
            self._quick_ack(delivery_tag)
            return
        super().ack(delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if self._connection_gone():
            self._quick_ack(delivery_tag)
            return
        super().reject(delivery_tag, requeue=requeue)


class _Channel(redis.Channel):
    QoS = _QoS


class _SentinelChannel(redis.SentinelChannel):
    QoS = _QoS


class Transport(redis.Transport):
    Channel = _Channel


class SentinelTransport(redis.SentinelTransport):
    Channel = _SentinelChannel
