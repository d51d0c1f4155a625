"""A generation as its reader sees it: the request, the handle it is submitted as, the outbox its deltas
and result arrive in, and the result."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from gkt.engine.sampling import Sampler

FINISH_REASONS = ("eos", "stop", "length", "cancelled", "deadline")


@dataclass(frozen=True, kw_only=True)
class EngineRequest:
    """One generation: an encoded prompt and how to continue it."""

    prompt_ids: Sequence[int]
    sampler: Sampler = field(default_factory=Sampler)
    max_new_tokens: int
    """At most this many tokens; 0 generates nothing: with `split_at`, the request only prepares its
    prompt's first part (kept in the prefix cache for a later request that starts with it)."""
    split_at: int | None = None
    """Prompt tokens computed before the rest (a student's question, known before the teacher's guidance):
    at admission they are prefilled in a pass of their own, or taken from the prefix cache when a
    request prepared them, and the rest of the prompt on top of them. The split is made whether or not
    they were prepared, so the request's tokens are the same either way. Used when
    0 < split_at < len(prompt_ids)."""
    stop: tuple[str, ...] = ()
    strip_leading: bool = False
    """Drop leading whitespace of the output (a student answering with no guidance starts after "A:")."""
    deadline: float | None = None
    """Wall-clock time (epoch seconds) after which the row stops with finish reason `deadline`."""
    cancelled: Callable[[], bool] | None = None
    """Checked before every step (it must be cheap): True stops the row with reason `cancelled`."""
    prompt: str = ""
    """The prompt's text; only the echo model reads it."""


@dataclass(frozen=True)
class EngineResult:
    text: str
    token_count: int
    """Tokens that made the kept text (a stop string's tokens excluded)."""
    finish_reason: str
    tokens: tuple[int, ...] = ()
    """Every token generated, the end-of-sequence token included."""
    first_token_s: float = field(default=0.0, compare=False)
    """Seconds from joining the queue to the first token (not part of what was generated)."""
    prepared: bool = field(default=False, compare=False)
    """Its prompt's first `split_at` tokens were found prepared in the prefix cache."""


class Outbox:
    """What a generation hands its reader, in order: text deltas, then its result or a failure
    (thread-safe: one thread puts, another collects)."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[str | EngineResult | BaseException] = queue.SimpleQueue()
        self._failure: BaseException | None = None
        """A failure that arrived behind text not yet collected: raised by the next `collect`."""

    def put(self, item: str | EngineResult | BaseException) -> None:
        self._items.put(item)

    def get(self, *, timeout_s: float | None) -> str | EngineResult | BaseException:
        return self._items.get(timeout=timeout_s)

    def collect(self, *, timeout_s: float) -> list[str | EngineResult]:
        """What arrived so far, waiting up to `timeout_s` for the first item ([] if none came); raises
        what failed the generation once the text made before the failure has been collected."""
        if self._failure is not None:
            raise self._failure
        items: list[str | EngineResult] = []
        try:
            item = self._items.get(timeout=timeout_s)
            while True:
                if isinstance(item, BaseException):
                    if items:  # the text made before the failure is handed out first
                        self._failure = item
                        return items
                    raise item
                items.append(item)
                item = self._items.get_nowait()
        except queue.Empty:
            return items


class GenerationFailed(RuntimeError):
    """A forward pass failed; every row it carried fails with it."""


class Generation:
    """A submitted request: its text deltas arrive on `deltas()`, then its result (thread-safe)."""

    def __init__(self, request: EngineRequest) -> None:
        self.request = request
        self.submitted = time.perf_counter()
        self._stop = threading.Event()
        self._outbox = Outbox()
        self.result: EngineResult | None = None

    def cancel(self) -> None:
        """Stop at the next step (finish reason `cancelled`)."""
        self._stop.set()

    def stopping(self) -> bool:
        return self._stop.is_set() or bool(self.request.cancelled and self.request.cancelled())

    def events(self, *, timeout_s: float | None = None) -> Iterator[str | EngineResult]:
        """Deltas as they are made, then the result; raises what failed the generation."""
        while True:
            item = self._outbox.get(timeout_s=timeout_s)
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, EngineResult):
                return

    def collect(self, *, timeout_s: float) -> list[str | EngineResult]:
        """What arrived so far (see `Outbox.collect`)."""
        return self._outbox.collect(timeout_s=timeout_s)

    def emit(self, item: str | EngineResult | BaseException) -> None:
        """Hand the reader a delta, the result or a failure (the engine's side)."""
        if isinstance(item, EngineResult):
            self.result = item
        self._outbox.put(item)
