"""One reader per gateway process: it follows every job event stream its calls wait on with a single
blocking XREAD, on a connection of its own, and routes each event to the calls that follow that job.

So a gateway holds one Redis connection for reading however many calls are in flight. A call that starts
following a job wakes the reader out of its blocking read (CLIENT UNBLOCK from another connection), so the
new job's events are not held up until the read times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gkt.jobs import decode_event
from gkt.keys import Keys
from gkt.queue import MAX_BLOCK_MS, AnyEvent

log = logging.getLogger(__name__)

Batch = list[tuple[str, AnyEvent]]
_ENTRIES_PER_READ = 256
_RETRY_AFTER_FAILURE_S = 0.5
_UNBLOCK_POLL_S = 0.002
_CLOSE_WAIT_S = 5.0


@dataclass(eq=False)
class Inbox:
    """What one call receives: batches of its job's events in order, or the error that ended reading."""

    stream: str
    cursor: tuple[int, int] = (0, 0)
    queue: asyncio.Queue[Batch | Exception] = field(default_factory=asyncio.Queue)

    async def next(self) -> Batch:
        item = await self.queue.get()
        if isinstance(item, Exception):
            raise item
        return item


class EventReader:
    """Follows job event streams for many calls with one blocking read at a time.

    `reader` is a client with a single connection (the blocking read's); `commands` is the gateway's
    command pool, used only to wake the reader.
    """

    def __init__(self, *, reader: Redis, commands: Redis, keys: Keys) -> None:
        self.reader = reader
        self.commands = commands
        self.keys = keys
        self._inboxes: dict[str, set[Inbox]] = {}
        self._changed = asyncio.Event()
        self._round = 0
        """Counts the reads issued: a read started after a call began following includes its stream."""
        self._client_id: int | None = None
        self._waking: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def followed(self) -> int:
        """Streams followed now."""
        return len(self._inboxes)

    @contextlib.asynccontextmanager
    async def follow(self, job_id: str) -> AsyncIterator[Inbox]:
        """An inbox of the job's events from its first, until the block ends."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="gkt-event-reader")
        inbox = Inbox(stream=self.keys.events(job_id))
        self._inboxes.setdefault(inbox.stream, set()).add(inbox)
        self._wake()
        try:
            yield inbox
        finally:
            followers = self._inboxes.get(inbox.stream, set())
            followers.discard(inbox)
            if not followers:
                self._inboxes.pop(inbox.stream, None)

    async def close(self) -> None:
        # the loop also ends on `_closing`: a cancel that lands inside the Redis client can come out as
        # one of its errors, which the loop outlives
        self._closing = True
        self._changed.set()
        for task in (self._task, self._waking):
            if task is not None:
                task.cancel()
                await asyncio.wait({task}, timeout=_CLOSE_WAIT_S)
        await self.reader.aclose()

    async def _run(self) -> None:
        failed = False
        while not self._closing:
            if not self._inboxes:
                self._changed.clear()
                await self._changed.wait()
                continue  # closing, or a stream to follow
            # 1) what to read: each stream after the oldest entry one of its followers has not seen
            self._round += 1
            streams: dict[Any, Any] = {
                stream: _entry_id(min(i.cursor for i in inboxes)) for stream, inboxes in self._inboxes.items()
            }
            # 2) read, retrying once on a fresh connection; a second failure ends every call's wait
            try:
                if self._client_id is None:
                    self._client_id = await self._own_client_id()
                reply: Any = await self.reader.xread(streams, block=MAX_BLOCK_MS, count=_ENTRIES_PER_READ)
                failed = False
            except (RedisConnectionError, RedisTimeoutError, ConnectionError) as exc:
                self._client_id = None
                if self.reader.connection is not None:
                    await self.reader.connection.disconnect()
                if failed:
                    log.warning("event reader: redis unavailable", extra={"error": str(exc)})
                    self._fail_all(exc)
                    await asyncio.sleep(_RETRY_AFTER_FAILURE_S)
                failed = True
                continue
            except Exception as exc:  # e.g. a refused command: the calls end with it, the reader goes on
                log.exception("event reader: read failed")
                self._fail_all(exc)
                await asyncio.sleep(_RETRY_AFTER_FAILURE_S)
                continue
            # 3) route each entry to the calls that have not seen it
            for stream, entries in reply or []:
                try:
                    self._route(_text(stream), entries)
                except Exception as exc:  # an entry that does not decode ends its calls, not the reader
                    log.exception("event reader: undecodable entry", extra={"stream": stream})
                    for inbox in self._inboxes.pop(_text(stream), set()):
                        inbox.queue.put_nowait(exc)

    async def _own_client_id(self) -> int:
        """This connection's CLIENT ID, for CLIENT UNBLOCK; 0 where the server refuses CLIENT (some managed
        Redis services do): reads then end by their timeout, and a new call waits up to that long."""
        try:
            return int(await self.reader.client_id())
        except ResponseError:
            log.warning(
                "CLIENT ID refused: new calls may wait up to %d ms for their first event", MAX_BLOCK_MS
            )
            return 0

    def _route(self, stream: str, entries: list[Any]) -> None:
        batch: list[tuple[tuple[int, int], str, AnyEvent]] = []
        for raw_id, fields in entries:
            entry_id = _text(raw_id)
            batch.append((_parse_id(entry_id), entry_id, decode_event(fields[b"e"])))
        for inbox in self._inboxes.get(stream, ()):
            unseen = [(entry_id, event) for key, entry_id, event in batch if key > inbox.cursor]
            if unseen:
                inbox.cursor = _parse_id(unseen[-1][0])
                inbox.queue.put_nowait(unseen)

    def _fail_all(self, exc: Exception) -> None:
        for inboxes in self._inboxes.values():
            for inbox in inboxes:
                inbox.queue.put_nowait(exc)

    def _wake(self) -> None:
        """Make the reader start a new read that includes every stream followed now."""
        self._changed.set()
        if self._waking is None or self._waking.done():
            self._waking = asyncio.create_task(self._unblock(self._round), name="gkt-event-reader-wake")

    async def _unblock(self, round_: int) -> None:
        # Under load a read returns within milliseconds anyway, with events of other jobs, and the next one
        # includes the new stream: wait that long before paying for a wake-up (and for the read it cuts).
        # The read of `round_` may also still be on its way to Redis, where CLIENT UNBLOCK finds nothing to
        # unblock yet: try again until it is unblocked or a newer read has begun.
        await asyncio.sleep(_UNBLOCK_POLL_S)
        while self._round == round_ and self._client_id != 0 and not self._closing:
            if self._client_id:
                try:
                    if await self.commands.client_unblock(self._client_id):
                        return
                except Exception:  # no permission for CLIENT UNBLOCK, or Redis away: the read times out
                    return
            await asyncio.sleep(_UNBLOCK_POLL_S)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _parse_id(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


def _entry_id(key: tuple[int, int]) -> str:
    return f"{key[0]}-{key[1]}"
