"""Calls sent at a running stack while something breaks, and what became of each: answered, failed with a
status, lost (silence until a generous deadline, or a stream that ended without its answer), or answered
more than once (a job whose event stream holds two final events).

The calls are streaming calls on an event loop of their own (a background thread), so the caller can kill
processes meanwhile; each carries a request id of its own, so its job can be found in Redis afterwards.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import grpc
from redis import Redis

from gkt.jobs import ErrorEvent, FinalEvent, Job, decode_event
from gkt.keys import Keys
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc

ANSWERED = "OK"
LOST = "LOST"
REQUEST_PREFIX = "chaos-"
_SERVER_FAULTS = {"INTERNAL", "UNKNOWN"}
_STREAMS_PER_CHANNEL = 90
"""Below a gateway's default GKT_GATEWAY_MAX_CONCURRENT_STREAMS (100): no call waits for a stream."""

MakeRequest = Callable[[int], pb.GenerateRequest]


@dataclass(frozen=True)
class Outcome:
    """One call: "OK", the status code's name, or LOST; the job it followed, when the gateway said."""

    request_id: str
    status: str
    ended_at: float
    job_id: str = ""


@dataclass
class Tally:
    """What a batch of calls came to."""

    sent: int = 0
    answered: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    duplicated: int = 0

    @property
    def server_faults(self) -> int:
        """Calls that ended INTERNAL or UNKNOWN: never a clear status."""
        return sum(count for status, count in self.failed.items() if status in _SERVER_FAULTS)

    def failed_text(self) -> str:
        return ", ".join(f"{status} {count}" for status, count in sorted(self.failed.items())) or "0"


class Load:
    """Streaming calls to one gateway, in flight on a background event loop until `wait()` collects them."""

    def __init__(self, addr: str, *, request: MakeRequest, deadline_s: float) -> None:
        self.addr = addr
        self.request = request
        self.deadline_s = deadline_s
        self.tag = uuid.uuid4().hex[:8]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gkt-load", daemon=True)
        self._thread.start()
        self._channels: list[grpc.aio.Channel] = []
        self._calls: list[Future[Outcome]] = []
        self.streaming = 0
        """Calls that have received their first event (the guidance) so far."""

    def send(self, n: int) -> None:
        """Start `n` more calls at once."""
        for _ in range(n):
            index = len(self._calls)
            self._calls.append(asyncio.run_coroutine_threadsafe(self._call(index), self._loop))

    def retry(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Send each call that failed with a status again, with its own request id, as a client would
        retry it, one at a time; their outcomes, in order."""
        retried = []
        for index, outcome in enumerate(outcomes):
            if outcome.status not in (ANSWERED, LOST):
                call = asyncio.run_coroutine_threadsafe(self._call(index), self._loop)
                retried.append(call.result(timeout=self.deadline_s + 60))
        return retried

    def request_ids(self) -> list[str]:
        return [self._request_id(i) for i in range(len(self._calls))]

    def ended(self) -> int:
        return sum(1 for call in self._calls if call.done())

    def wait(self, *, timeout_s: float) -> list[Outcome]:
        """Every call's outcome (each ends by its own deadline, so this returns by then)."""
        return [call.result(timeout=timeout_s) for call in self._calls]

    def close(self) -> None:
        async def close_channels() -> None:
            for channel in self._channels:
                await channel.close()

        asyncio.run_coroutine_threadsafe(close_channels(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def _request_id(self, index: int) -> str:
        return f"{REQUEST_PREFIX}{self.tag}-{index}"

    def _stub(self, index: int) -> guidance_pb2_grpc.GuidanceServiceStub:
        slot = index // _STREAMS_PER_CHANNEL
        while len(self._channels) <= slot:
            options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, not a shared one
            self._channels.append(grpc.aio.insecure_channel(self.addr, options=options))
        return guidance_pb2_grpc.GuidanceServiceStub(self._channels[slot])

    async def _call(self, index: int) -> Outcome:
        request = pb.GenerateRequest()
        request.CopyFrom(self.request(index))
        request.request_id = self._request_id(index)
        status, job_id = await stream_call(
            self._stub(index), request, timeout_s=self.deadline_s, on_first=self._on_first
        )
        return Outcome(request_id=request.request_id, status=status, ended_at=time.monotonic(), job_id=job_id)

    def _on_first(self) -> None:
        self.streaming += 1


async def stream_call(
    stub: guidance_pb2_grpc.GuidanceServiceStub,
    request: pb.GenerateRequest,
    *,
    timeout_s: float,
    on_first: Callable[[], None] = lambda: None,
) -> tuple[str, str]:
    """One streaming call to its end: ("OK", job id) when the answer came, (status name, "") when the call
    failed, LOST when it met its deadline or ended without an answer. `on_first` runs at the first event."""
    first = True
    try:
        async for reply in stub.GenerateStream(request, timeout=timeout_s):
            if first:
                on_first()
                first = False
            if reply.HasField("final"):
                return ANSWERED, reply.final.job_id
        return LOST, ""
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return LOST, ""
        return error.code().name, ""


def tally(
    outcomes: list[Outcome], *, redis: Redis, keys: Keys, retried: list[Outcome] | None = None
) -> Tally:
    """Count outcomes; a job (found by its call's request id) with more than one final event is duplicated.
    `retried`: later attempts of some of the same calls, whose jobs are checked for duplicates too."""
    result = Tally(sent=len(outcomes))
    for outcome in outcomes:
        if outcome.status == ANSWERED:
            result.answered += 1
        elif outcome.status == LOST:
            result.lost += 1
        else:
            result.failed[outcome.status] += 1
    jobs = jobs_of_requests(redis, keys=keys, request_ids={o.request_id for o in outcomes})
    jobs.update(o.job_id for o in [*outcomes, *(retried or [])] if o.job_id)
    result.duplicated = sum(1 for job_id in jobs if len(finals(redis, keys=keys, job_id=job_id)) > 1)
    return result


def jobs_of_requests(redis: Redis, *, keys: Keys, request_ids: set[str]) -> set[str]:
    """The jobs the gateway recorded for these request ids (whatever the tenant)."""
    found = set()
    for key in redis.scan_iter(match=keys.request("*", f"{REQUEST_PREFIX}*"), count=1000):
        if key.decode().rsplit(":", 1)[-1] in request_ids:
            value: Any = redis.get(key)
            if value:
                found.add(Job.model_validate_json(value).id)
    return found


def finals(redis: Redis, *, keys: Keys, job_id: str) -> list[FinalEvent | ErrorEvent]:
    """The final events (answers or errors) a job's event stream holds: exactly one when all went well."""
    entries: Any = redis.xrange(keys.events(job_id))
    events = (decode_event(fields[b"e"]) for _entry_id, fields in entries)
    return [event for event in events if isinstance(event, FinalEvent | ErrorEvent)]


def first_answer(
    addr: str, request: pb.GenerateRequest, *, timeout_s: float, call_timeout_s: float
) -> float | None:
    """Send `request` again and again (one call at a time) until one is answered; when that was
    (time.monotonic()), or None when none was within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(addr) as channel:
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                stub.Generate(request, timeout=min(call_timeout_s, max(1.0, deadline - time.monotonic())))
                return time.monotonic()
            except grpc.RpcError:
                time.sleep(0.5)
    return None
