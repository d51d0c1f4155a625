"""The remote student backends' common part: jobs streamed from an inference server by an event loop of
the process's own, while each job's task thread reads its deltas as it would from the engine.

Until a stream's first token arrives, an attempt that fails is retried (nothing has been shown yet);
after it, a broken stream fails the job with UNAVAILABLE. Cancellation and the deadline close the
stream, so the server stops generating for a job nobody waits for.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gkt import metrics
from gkt.engine.generation import EngineResult, Outbox
from gkt.errors import StatusCode
from gkt.remote.errors import AttemptError, BackendError
from gkt.remote.resilience import ResilientCaller
from gkt.remote.sse import stream_broken
from gkt.stops import StopScanner
from services.student.backends.base import StudentRequest

log = logging.getLogger(__name__)

T = TypeVar("T")
_WATCH_S = 0.1
"""How often a running job's cancellation and deadline are checked."""
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")


@dataclass(frozen=True)
class Piece:
    """One event of a stream: text (one token's, usually), and what the server says at the end."""

    text: str = ""
    tokens: int = 1
    finish: str | None = None
    """"length", "stop" or "eos" on the event that ends generation."""
    total_tokens: int | None = None
    """The server's own count of generated tokens, when it sends one."""


class ServerStream(Protocol):
    async def next(self) -> Piece | None:
        """The next piece; None once the stream has ended. Raises `AttemptError`."""
        ...

    async def aclose(self) -> None: ...


class ServerClient(Protocol):
    """One server API: how to start, check limits, and open a job's stream."""

    name: str
    resilience: ResilientCaller

    async def start(self) -> None: ...

    def check_limits(self, *, max_new_tokens: int, max_batch: int) -> None: ...

    async def open(self, request: StudentRequest) -> ServerStream: ...

    async def close(self) -> None: ...


def invalid_field(message: str) -> str:
    """The request field a server's validation error is about: a length limit is the job's token limit,
    a sampling parameter its own field, anything else the prompt (the query and its guidance)."""
    lowered = message.lower()
    if re.search(r"max_new_tokens|max_tokens|in the completion", lowered):
        return "sampling.max_new_tokens"
    named = next((f for f in _SAMPLING_FIELDS if re.search(rf"`?\b{f}\b`?", lowered)), None)
    return f"sampling.{named}" if named else "query"


class RemoteGeneration:
    """A job being streamed: the task thread collects, the event loop emits."""

    def __init__(self, request: StudentRequest) -> None:
        self.request = request
        self.submitted = time.perf_counter()
        self._outbox = Outbox()
        self._stop = threading.Event()

    def cancel(self) -> None:
        self._stop.set()

    def stopping(self) -> bool:
        return self._stop.is_set() or self.request.cancelled()

    def collect(self, *, timeout_s: float) -> list[str | EngineResult]:
        return self._outbox.collect(timeout_s=timeout_s)

    def emit(self, item: str | EngineResult | BackendError) -> None:
        self._outbox.put(item)


class RemoteStudentBackend:
    """Streams every submitted job from one server, on an event loop thread of its own."""

    prepares = False

    def __init__(self, client: ServerClient) -> None:
        self.client = client
        self.name = client.name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="gkt-student-streams", daemon=True
        )

    def start(self, *, max_new_tokens: int, max_batch: int) -> None:
        """Connect, and refuse a server that cannot generate `max_new_tokens` or serve `max_batch` at once."""
        self._thread.start()
        try:
            self._run(self.client.start())
            self.client.check_limits(max_new_tokens=max_new_tokens, max_batch=max_batch)
        except BaseException:
            self.stop()
            raise

    def prepare(self, first_part: str, *, timeout_s: float) -> bool:
        """An inference server keeps its own cache (vLLM's and TGI's prefix caching): nothing to prepare."""
        return False

    def submit(self, request: StudentRequest) -> RemoteGeneration:
        generation = RemoteGeneration(request)
        asyncio.run_coroutine_threadsafe(self._drive(generation), self._loop)
        return generation

    def stop(self) -> None:
        if self._thread.is_alive():
            self._run(self.client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    async def _drive(self, generation: RemoteGeneration) -> None:
        """Stream the job, stopping it when it is cancelled or its deadline passes."""
        producer = asyncio.create_task(self._produce(generation))
        reason = ""
        while not producer.done():
            left = generation.request.deadline - time.time()
            await asyncio.wait({producer}, timeout=max(0.0, min(_WATCH_S, left)))
            if producer.done():
                break
            if generation.stopping():
                reason = "cancelled"
            elif time.time() >= generation.request.deadline:
                reason = "deadline"
            if reason:
                producer.cancel()
                break
        try:
            generation.emit(await producer)
        except asyncio.CancelledError:
            if not reason:
                raise
            generation.emit(EngineResult(text="", token_count=0, finish_reason=reason))
        except BackendError as exc:
            _failed(generation, exc)
        except Exception as exc:  # a bug: the job fails at once, the loop goes on
            log.exception("student stream failed unexpectedly")
            _failed(
                generation,
                BackendError(
                    f"the student failed ({type(exc).__name__})", code=StatusCode.INTERNAL, kind="internal"
                ),
            )

    async def _produce(self, generation: RemoteGeneration) -> EngineResult:
        request = generation.request
        resilience = self.client.resilience
        stream, first = await resilience.call(lambda: self._first_piece(request))
        piece: Piece | None = first
        scanner = StopScanner(stop=request.stop, strip_leading=request.strip_leading)
        first_token_s = time.perf_counter() - generation.submitted
        finish: str | None = None
        total: int | None = None
        tokens = 0
        try:
            while piece is not None:
                tokens += piece.tokens
                if piece.tokens:
                    delta = scanner.push(piece.text)
                    if delta:
                        generation.emit(delta)
                finish = piece.finish or finish
                total = piece.total_tokens if piece.total_tokens is not None else total
                if scanner.stopped:
                    finish = "stop"  # a stop string the server was not given (or kept): stop it here
                    break
                async with asyncio.timeout(resilience.request_timeout_s):
                    piece = await stream.next()
            if finish is None:
                raise stream_broken("the stream ended before the server said why")
        except (AttemptError, TimeoutError) as exc:
            error = exc if isinstance(exc, AttemptError) else _idle(resilience.request_timeout_s)
            resilience.record(error)
            raise resilience.fail(
                resilience.final(error, note=f" (the stream broke after {tokens} tokens)")
            ) from exc
        finally:
            await stream.aclose()
        rest = scanner.flush()
        if rest:
            generation.emit(rest)
        # The server's count includes the end-of-sequence and stop-string tokens the text leaves out; the
        # engine counts only the tokens of the kept text, and so does this, unless the limit ended it.
        counted = total if total is not None and finish == "length" else scanner.kept_pieces
        return EngineResult(
            text=scanner.text, token_count=counted, finish_reason=finish, first_token_s=first_token_s
        )

    async def _first_piece(self, request: StudentRequest) -> tuple[ServerStream, Piece]:
        """One attempt: open the stream and read its first event (a failure is retried: nothing was shown)."""
        stream = await self.client.open(request)
        try:
            piece = await stream.next()
        except BaseException:
            await stream.aclose()
            raise
        if piece is None:
            await stream.aclose()
            raise stream_broken("the stream ended before its first token")
        return stream, piece


def _failed(generation: RemoteGeneration, error: BackendError) -> None:
    """Fail the job with `error`, counted by kind in the students' metric."""
    metrics.STUDENT_BACKEND_ERRORS.labels(error.kind).inc()
    generation.emit(error)


def _idle(timeout_s: float) -> AttemptError:
    return AttemptError(
        f"no token for {timeout_s:g} s", kind="timeout", code=StatusCode.UNAVAILABLE, server_fault=True
    )
