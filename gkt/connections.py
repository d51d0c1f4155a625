"""Every Redis client GKT Serve makes, built from one URL: a Redis server (redis://, rediss://, unix://) or
the master a Sentinel group names (redis+sentinel://), for redis-py (sync and asyncio) and for Celery.

A Sentinel URL lists the sentinels, then the master's name and the database:
`redis+sentinel://[[user]:password@]host1:26379,host2:26379,host3:26379/mymaster/0`. The password is
the master's (and its replicas'); the sentinels are asked without one. Clients ask the sentinels where
the master is whenever they connect, so after a failover a fresh connection reaches the new master.
"""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from redis import Redis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelConnection
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry as SyncRetry
from redis.sentinel import Sentinel, SentinelManagedConnection

from gkt.errors import ResourceExhausted

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
_SOCKET_TIMEOUT_S = 10
"""Well above the longest blocking read (`gkt.queue.MAX_BLOCK_MS`), so an idle wait is never a timeout."""
_CONNECT_TIMEOUT_S = 5
_SENTINEL_OPTIONS: dict[str, Any] = {"socket_timeout": 2, "socket_connect_timeout": 2}
"""The sentinels are asked without a password; one that does not answer within 2 s is skipped."""
_OPTIONS: dict[str, Any] = {
    "socket_timeout": _SOCKET_TIMEOUT_S,
    "socket_connect_timeout": _CONNECT_TIMEOUT_S,
    "health_check_interval": 30,
}
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


@dataclass(frozen=True)
class SentinelTarget:
    """Where a redis+sentinel:// URL points: the sentinels to ask, the master's name, the database."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def sentinel_target(url: str) -> SentinelTarget | None:
    """The Sentinel group a redis+sentinel:// URL names; None for any other URL. A malformed one is a
    ValueError that says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return None
    if parts.query:
        raise ValueError(
            f"{SENTINEL_SCHEME}:// takes no query parameters (TLS is not supported with Sentinel)"
        )
    hosts = parts.netloc.rpartition("@")[2]
    sentinels = tuple(_host_port(item) for item in hosts.split(",") if item)
    if not sentinels:
        raise ValueError(f"{SENTINEL_SCHEME}:// needs at least one sentinel host:port")
    path = [unquote(part) for part in parts.path.strip("/").split("/")]
    if not path[0] or len(path) > 2:
        raise ValueError(
            f"expected {SENTINEL_SCHEME}://host:port,…/MASTER_NAME[/DB], got the path {parts.path!r}"
        )
    db = path[1] if len(path) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"database {db!r}: expected a number")
    return SentinelTarget(
        sentinels=sentinels,
        master=path[0],
        db=int(db),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def connect(url: str, **options: Any) -> Redis:
    """A synchronous client (students, tools); `options` replace the default timeouts."""
    options = {**_OPTIONS, **options}
    target = sentinel_target(url)
    if target is None:
        return Redis.from_url(url, **options)
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=_SENTINEL_OPTIONS)
    return sentinel.master_for(
        target.master, connection_class=_MasterConnection, **_master_options(target), **options
    )


def outlasting(outage_s: float) -> SyncRetry:
    """A synchronous client's retry policy that waits out a Redis outage of about `outage_s` (a restart, a
    failover): a command that meets a connection error is sent again after 0.1 s, doubling to 1 s."""
    doublings = 4  # 0.1 + 0.2 + 0.4 + 0.8 s, then 1 s a try
    return SyncRetry(ExponentialBackoff(cap=1.0, base=0.05), doublings + max(0, math.ceil(outage_s - 1.5)))


def connect_async(url: str, **options: Any) -> AsyncRedis:
    """An asyncio client (the teacher); `options` replace the default timeouts."""
    options = {**_OPTIONS, **options}
    target = sentinel_target(url)
    if target is None:
        return AsyncRedis.from_url(url, **options)
    sentinel = AsyncSentinel(target.sentinels, sentinel_kwargs=_SENTINEL_OPTIONS)
    return sentinel.master_for(
        target.master, connection_class=_AsyncMasterConnection, **_master_options(target), **options
    )


def connect_bounded(url: str, *, max_connections: int, wait_s: float, client_name: str) -> AsyncRedis:
    """A client that holds at most `max_connections` connections, named `client_name` in CLIENT LIST.

    A command waits up to `wait_s` for a free connection. A command that meets a dead connection (Redis
    restarted, a proxy dropped it, the master failed over) is sent once more on a fresh one, at once: a
    second failure means Redis is really away, and the caller hears it without delay.
    """
    options: dict[str, Any] = {
        **_OPTIONS,
        "max_connections": max_connections,
        "timeout": wait_s,
        "client_name": client_name,
        "retry": Retry(NoBackoff(), 1),
    }
    target = sentinel_target(url)
    if target is None:
        return AsyncRedis(connection_pool=_BoundedPool.from_url(url, **options))
    pool = _BoundedSentinelPool(
        target.master,
        AsyncSentinel(target.sentinels, sentinel_kwargs=_SENTINEL_OPTIONS),
        connection_class=_AsyncMasterConnection,
        **_master_options(target),
        **options,
    )
    return AsyncRedis.from_pool(pool)


def connect_reader(url: str, *, client_name: str) -> AsyncRedis:
    """A client of one connection for a blocking reader, named `client_name` in CLIENT LIST; it never
    retries on its own, so its owner knows when the connection (and its CLIENT ID) changed."""
    options: dict[str, Any] = {
        "socket_timeout": _SOCKET_TIMEOUT_S,
        "socket_connect_timeout": _CONNECT_TIMEOUT_S,
        "client_name": client_name,
        "retry": Retry(NoBackoff(), 0),
    }
    target = sentinel_target(url)
    if target is None:
        return AsyncRedis.from_url(url, single_connection_client=True, **options)
    sentinel = AsyncSentinel(target.sentinels, sentinel_kwargs=_SENTINEL_OPTIONS)
    pool = AsyncSentinelPool(
        target.master, sentinel, connection_class=_AsyncMasterConnection, **_master_options(target), **options
    )
    client = AsyncRedis(connection_pool=pool, single_connection_client=True)
    client.auto_close_connection_pool = True  # as from_pool does: closing the client closes its pool
    return client


def celery_broker(
    url: str, *, key_prefix: str, transport_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Celery's broker settings for a Redis URL and key prefix.

    Every key Celery makes (the task queues, `unacked`, kombu's bindings) starts with `{key_prefix}:`
    (kombu's `global_keyprefix`), so two deployments with different prefixes on one Redis database share
    nothing. TLS options go to `broker_use_ssl` alone, because kombu would let the URL's `ssl_*` query
    parameters replace them (dropping the certificate requirement). A Sentinel URL becomes kombu's
    `sentinel://` form, one URL per sentinel, with the master's name as a transport option.
    """
    options = {"global_keyprefix": f"{key_prefix}:", **(transport_options or {})}
    target = sentinel_target(url)
    if target is not None:
        auth = ""
        if target.username or target.password:
            auth = f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"
        hosts = ";".join(f"sentinel://{auth}{_netloc(h, p)}/{target.db}" for h, p in target.sentinels)
        return {
            "broker_url": hosts,
            "broker_use_ssl": None,
            "broker_transport_options": {**options, "master_name": target.master},
        }
    parts = urlsplit(url)
    query = [(name, value) for name, value in parse_qsl(parts.query) if not name.startswith("ssl_")]
    plain = urlunsplit(parts._replace(query="&".join(f"{n}={quote(v, safe='')}" for n, v in query)))
    return {
        "broker_url": plain,
        "broker_use_ssl": broker_tls_options(url),
        "broker_transport_options": options,
    }


def broker_tls_options(url: str) -> dict[str, Any] | None:
    """Celery's `broker_use_ssl` for a rediss:// URL, from the same query parameters redis-py reads.

    Celery refuses a rediss:// broker without them; certificates are verified unless the URL says
    `ssl_cert_reqs=none`.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = dict(parse_qsl(parts.query))
    requirement = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if requirement not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs={requirement!r}: expected required, optional or none")
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[requirement]}
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in query:
            options[name] = query[name]
    return options


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


class _BoundedSentinelPool(AsyncSentinelPool, _BoundedPool):
    """The bounded pool, its connections made to the master the sentinels name."""


class _MasterConnection(SentinelManagedConnection):
    """A connection to the master the sentinels name, asked again at every reconnection.

    redis-py asks the sentinels when a pool hands out a connection, but a connection that breaks during a
    command reconnects by itself (a retry, a single-connection client) to the address it had: after a
    failover, the dead master's.
    """

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if self._sock is None:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class _AsyncMasterConnection(AsyncSentinelConnection):
    """`_MasterConnection` for asyncio clients."""

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not self.is_connected:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )


def _host_port(item: str) -> tuple[str, int]:
    if item.startswith("["):  # an IPv6 address
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"sentinel {item!r}: expected host:port")
    return host, int(port or SENTINEL_PORT)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _master_options(target: SentinelTarget) -> dict[str, Any]:
    return {"db": target.db, "username": target.username, "password": target.password}
