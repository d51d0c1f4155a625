"""The `echo-benchmark-only` backend: guidance at no cost, to measure the serving path alone.

It is never a default and never a model: the guidance is the first words of the job's question.
`gkt bench` pairs it with the student model of the same name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from services.teacher.backends.base import BackendError, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


class EchoBackend:
    """Returns the first `max_guidance_tokens` words of each prompt's last question, instantly."""

    name = "echo-benchmark-only"
    concurrency = 256

    async def start(self) -> None:
        log.warning("teacher backend echo-benchmark-only: guidance is not generated (benchmarks only)")

    def check_limits(self, *, max_guidance_tokens: int) -> None:
        """Any length is fine: nothing is generated."""

    async def generate(self, request: GenerationRequest) -> GenerationResult | BackendError:
        return echo(request)

    async def generate_batch(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | BackendError]:
        return [echo(request) for request in requests]

    async def close(self) -> None:
        """Nothing to release."""


def echo(request: GenerationRequest) -> GenerationResult:
    """The request's guidance: words of the question after the prompt's last `Q: `, one per token."""
    question = request.prompt.rsplit("Q: ", 1)[-1].split("\n", 1)[0]
    words = question.split()[: request.max_guidance_tokens]
    finish = "length" if len(words) == request.max_guidance_tokens else "eos"
    return GenerationResult(text=" ".join(words), token_count=len(words), finish_reason=finish)
