"""What a student generates with: one job's prompt and sampling in; its text deltas, then one result, out.

The `local` backend decodes on the process's engine; `openai` and `tgi` stream from an inference server.
Either way a task thread submits a request and reads what arrives, as `gkt.engine.Generation` offers it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gkt.engine import EngineResult
from gkt.jobs import SamplingParams


@dataclass(frozen=True, kw_only=True)
class StudentRequest:
    """One job's generation."""

    prompt: str
    sampling: SamplingParams
    """The job's own temperature, top-p, top-k, repetition penalty, seed and token limit."""
    stop: tuple[str, ...]
    """Every stop string: the task format's and the job's own."""
    strip_leading: bool
    """Drop leading whitespace of the output (a student answering with no guidance starts after "A:")."""
    deadline: float
    """Wall-clock time (epoch seconds) at which generation stops with finish reason `deadline`."""
    cancelled: Callable[[], bool]
    """Checked often (it must be cheap): True stops generation with finish reason `cancelled`."""
    first_part: str = ""
    """The prompt's text before the guidance, which a backend that prepares may have computed already
    (`StudentBackend.prepare`); empty: no guidance, nothing to split."""


class Stream(Protocol):
    """A submitted request: text deltas as they are made, then its `EngineResult` (thread-safe)."""

    def collect(self, *, timeout_s: float) -> list[str | EngineResult]:
        """What arrived so far, waiting up to `timeout_s` for the first item; raises what failed it."""
        ...

    def cancel(self) -> None:
        """Stop soon (finish reason `cancelled`)."""


class StudentBackend(Protocol):
    """A model that continues many prompts at once: `local`, `openai` or `tgi`."""

    name: str
    prepares: bool
    """Whether `prepare` does anything (the local engine) or nothing (an inference server)."""

    def prepare(self, first_part: str, *, timeout_s: float) -> bool:
        """Compute a prompt's first part now, for a request that starts with it later; blocks until done
        (at most `timeout_s`). False when there was nothing to prepare."""
        ...

    def submit(self, request: StudentRequest) -> Stream:
        """Start generating; raises a `GktError` (e.g. `InvalidArgument`) for a request it refuses."""
        ...

    def stop(self) -> None:
        """Release the model or the server's connections."""
