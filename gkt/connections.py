"""Redis clients: plain ones, a bounded pool whose exhaustion is overload, and a single-connection reader."""

from __future__ import annotations

from typing import Any

from redis import Redis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gkt.errors import ResourceExhausted

_SOCKET_TIMEOUT_S = 10
"""Well above the longest blocking read (`gkt.queue.MAX_BLOCK_MS`), so an idle wait is never a timeout."""


def connect(url: str) -> Redis:
    return Redis.from_url(
        url, socket_timeout=_SOCKET_TIMEOUT_S, socket_connect_timeout=5, health_check_interval=30
    )


def connect_async(url: str) -> AsyncRedis:
    return AsyncRedis.from_url(
        url, socket_timeout=_SOCKET_TIMEOUT_S, socket_connect_timeout=5, health_check_interval=30
    )


def connect_bounded(url: str, *, max_connections: int, wait_s: float, client_name: str) -> AsyncRedis:
    """A client that holds at most `max_connections` connections, named `client_name` in CLIENT LIST.

    A command waits up to `wait_s` for a free connection. A command that meets a dead connection (Redis
    restarted, a proxy dropped it) is sent once more on a fresh one, at once: a second failure means Redis
    is really away, and the caller hears it without delay.
    """
    pool = _BoundedPool.from_url(
        url,
        max_connections=max_connections,
        timeout=wait_s,
        socket_timeout=_SOCKET_TIMEOUT_S,
        socket_connect_timeout=5,
        health_check_interval=30,
        client_name=client_name,
        retry=Retry(NoBackoff(), 1),
    )
    return AsyncRedis(connection_pool=pool)


def connect_reader(url: str, *, client_name: str) -> AsyncRedis:
    """A client of one connection for a blocking reader, named `client_name` in CLIENT LIST; it never
    retries on its own, so its owner knows when the connection (and its CLIENT ID) changed."""
    return AsyncRedis.from_url(
        url,
        single_connection_client=True,
        socket_timeout=_SOCKET_TIMEOUT_S,
        socket_connect_timeout=5,
        client_name=client_name,
        retry=Retry(NoBackoff(), 0),
    )


class _BoundedPool(BlockingConnectionPool):
    """A pool whose every connection busy past its wait is overload (RESOURCE_EXHAUSTED), not an outage."""

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        try:
            return await super().get_connection(command_name, *keys, **options)
        except RedisConnectionError as exc:
            if str(exc) != "No connection available.":
                raise
            raise ResourceExhausted(
                f"all {self.max_connections} Redis connections stayed busy for {self.timeout:g} s; retry shortly"
            ) from exc
