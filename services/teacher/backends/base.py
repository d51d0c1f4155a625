"""The teacher backend protocol: guidance for one prompt, or for a whole batch in one call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gkt.remote.errors import BackendError


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One prompt of a batch, with the teacher's sampling settings for it."""

    prompt: str
    max_guidance_tokens: int
    """N: the most teacher tokens of guidance to generate."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """What the model produced for one request.

    `text` holds at most `max_guidance_tokens` teacher tokens, cut before the first stop sequence;
    `token_count` is the number of tokens that text came from.
    """

    text: str
    token_count: int
    finish_reason: str  # "length" | "stop" | "eos"


class TeacherBackend(Protocol):
    """A model that can continue many prompts; implementations: local, tgi, openai."""

    name: str
    concurrency: int
    """Requests it works on at once (known after `start`): the pipelined teacher's default in-flight limit."""

    async def start(self) -> None:
        """Connect / load, and refuse settings the model cannot honour (raise ValueError)."""

    def check_limits(self, *, max_guidance_tokens: int) -> None:
        """After start(): raise ValueError (naming the values) if guidance this long cannot be generated."""

    async def generate(self, request: GenerationRequest) -> GenerationResult | BackendError:
        """Generate for one request; many may run at once (the pipelined teacher keeps them in flight)."""
        ...

    async def generate_batch(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | BackendError]:
        """Generate for every request; one failed request never fails its batch-mates."""
        ...

    async def close(self) -> None:
        """Release connections and memory."""
