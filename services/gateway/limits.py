"""Per-key limits held in Redis, so they hold across gateway replicas: a GCRA rate bucket updated by one Lua
script against Redis's own clock, and concurrency leases that each RPC's gateway renews while it runs (a
gateway that dies leaks no concurrency for longer than one lease TTL)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from redis.asyncio import Redis

from gkt.keys import Keys
from services.gateway.auth import ApiKey
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

# A bounded set of expiring members (ZSET scored by expiry, Redis's clock): returns 1 when ARGV[3] was
# added, 0 when the set holds ARGV[1] members that have not expired. A member lives ARGV[2] ms. Concurrency
# leases and the tenants' queue slots are such sets.
TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""
# Returns 0 when the request may go, else the milliseconds until it could.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if allow_at > now then return math.ceil(allow_at - now) end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
return 0
"""
# Pushes a lease's expiry to now + ARGV[1] ms (re-adding it if it lapsed: its RPC is still running).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""


@dataclass(frozen=True)
class Limits:
    """One key's effective limits; 0 means unlimited."""

    rate_per_s: float
    burst: int
    max_concurrent: int
    max_queued: int

    @classmethod
    def of(cls, key: ApiKey, settings: GatewaySettings) -> Limits:
        """The key's own limits where its line sets them, the gateway's defaults elsewhere."""
        rate = key.rate_per_s if key.rate_per_s is not None else settings.gateway_key_rate_per_s
        burst = key.burst if key.burst is not None else settings.gateway_key_burst
        concurrent = (
            key.max_concurrent if key.max_concurrent is not None else settings.gateway_key_max_concurrent
        )
        queued = key.max_queued if key.max_queued is not None else settings.gateway_key_max_queued
        return cls(
            rate_per_s=rate,
            burst=burst or max(1, math.ceil(rate)),
            max_concurrent=concurrent,
            max_queued=queued,
        )


class Limiter:
    """The Redis side of the limits, shared by every gateway replica."""

    def __init__(self, *, redis: Redis, keys: Keys) -> None:
        self.keys = keys
        self.redis = redis
        self._gcra = redis.register_script(_GCRA)
        self._lease = redis.register_script(TAKE_SLOT)
        self._renew = redis.register_script(_RENEW)

    async def take(self, key_id: str, *, rate_per_s: float, burst: int) -> float:
        """Spend one request of the key's rate: 0 if allowed, else the seconds until one would be."""
        wait_ms = await self._gcra(keys=[self.keys.rate(key_id)], args=[1000.0 / rate_per_s, burst])
        return int(wait_ms) / 1000

    async def acquire(self, key_id: str, *, limit: int, ttl_s: float) -> str | None:
        """A lease id if the key has fewer than `limit` RPCs in flight; it expires after `ttl_s`."""
        lease = uuid.uuid4().hex
        ttl_ms = max(1, math.ceil(ttl_s * 1000))
        taken = await self._lease(keys=[self.keys.leases(key_id)], args=[limit, ttl_ms, lease])
        return lease if int(taken) else None

    async def renew(self, key_id: str, lease: str, *, ttl_s: float) -> None:
        """Keep a lease of a running RPC for another `ttl_s`."""
        await self._renew(keys=[self.keys.leases(key_id)], args=[max(1, math.ceil(ttl_s * 1000)), lease])

    async def release(self, key_id: str, lease: str) -> None:
        try:
            await self.redis.zrem(self.keys.leases(key_id), lease)
        except Exception:  # Redis gone: the lease expires one TTL after its last renewal instead
            log.warning("could not release a concurrency lease", extra={"key_name": key_id})

    @contextlib.asynccontextmanager
    async def holding(self, key_id: str, lease: str | None, *, ttl_s: float) -> AsyncIterator[None]:
        """Renew `lease` every third of its TTL while the block runs; release it when the block ends."""
        if lease is None:
            yield
            return
        ended = asyncio.Event()
        renewing = asyncio.create_task(self._keep(key_id, lease, ttl_s=ttl_s, ended=ended))
        try:
            yield
        finally:
            ended.set()
            renewing.cancel()
            await asyncio.shield(self.release(key_id, lease))

    async def _keep(self, key_id: str, lease: str, *, ttl_s: float, ended: asyncio.Event) -> None:
        # ends on `ended`, not on the cancel alone: a cancel that lands inside the Redis client can come
        # out as one of its errors, which this loop outlives
        while not ended.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), timeout=ttl_s / 3)
                return
            try:
                await self.renew(key_id, lease, ttl_s=ttl_s)
            except Exception:  # Redis gone for now: the next renewal re-adds the lease
                log.warning("could not renew a concurrency lease", extra={"key_name": key_id})
