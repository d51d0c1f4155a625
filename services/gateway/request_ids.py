"""Idempotent retries: a request id names one job per tenant. A retry replays the answer of a job already
answered, follows one still on its way, and starts afresh when the earlier job ended unanswered."""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio import Redis

from gkt.jobs import ErrorEvent, FinalEvent, Job, decode_event
from gkt.keys import Keys
from services.gateway.tenancy import Tenant

log = logging.getLogger(__name__)

# Set a request id's job to ARGV[2] (for ARGV[3] s) when the key is missing or still holds ARGV[1] (the
# ended job a retry replaces; "" for none); otherwise return the job it holds.
_REPLACE_REQUEST = """
local current = redis.call('GET', KEYS[1])
if not current or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return false
end
return current
"""


class RequestIds:
    """The request-id records of one gateway's Redis."""

    def __init__(self, *, redis: Redis, keys: Keys, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self._replace = redis.register_script(_REPLACE_REQUEST)

    async def claim(self, job: Job, *, tenant: Tenant) -> Job | None:
        """Make `job` the job of its request id, unless the id names a job to attach to: one answered (its
        stored answer is replayed) or one still on its way within its deadline. A job that ended without an
        answer (cancelled, failed, or past its deadline) is replaced, so a retry starts afresh. Returns the
        job to attach to, or None when `job` is the request's job now."""
        key = self.keys.request(tenant.id, job.request_id)
        replacing: Any = None
        while True:
            current: Any = await self._replace(
                keys=[key], args=[replacing or "", job.model_dump_json(), self.ttl_s]
            )
            if current is None:
                if replacing is not None:
                    log.info(
                        "request_id's earlier job ended unanswered: starting afresh",
                        extra={"request_id": job.request_id},
                    )
                return None
            earlier = Job.model_validate_json(current)
            if not await self.ended_unanswered(earlier):
                return earlier
            replacing = current  # unless another retry replaced it first, then that one is followed

    async def ended_unanswered(self, job: Job) -> bool:
        """Whether a job will never be answered: it failed, was cancelled, or its deadline passed first."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xrevrange(self.keys.events(job.id), count=1)
            pipe.exists(self.keys.cancelled(job.id))
            last, cancelled = await pipe.execute()
        event = decode_event(last[0][1][b"e"]) if last else None
        if isinstance(event, FinalEvent):
            return False
        return isinstance(event, ErrorEvent) or bool(cancelled) or job.expired()
