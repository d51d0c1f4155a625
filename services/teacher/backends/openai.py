"""The `openai` backend: OpenAI-compatible `/v1/completions` (vLLM, SGLang, TGI, llama.cpp, OpenAI)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import httpx2

from gkt.remote.errors import BackendError, malformed, status_error, transport_error
from gkt.remote.openai import OpenAIServer, finish_reason
from gkt.remote.resilience import ResilientCaller
from gkt.stops import first_stop
from services.teacher.backends.base import GenerationRequest, GenerationResult
from services.teacher.settings import TeacherServerSettings

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 32


class OpenAIBackend:
    """Sends each prompt as its own completion request, so one bad prompt fails only its own job."""

    name = "openai"

    def __init__(self, *, settings: TeacherServerSettings, model: str = "") -> None:
        self.concurrency = settings.max_concurrency or DEFAULT_CONCURRENCY
        self.server = OpenAIServer(settings=settings, model=model, connections=self.concurrency)
        self._limit = asyncio.Semaphore(self.concurrency)
        self.resilience = ResilientCaller(settings=settings, name="teacher backend openai")

    @property
    def model(self) -> str:
        """The model name sent with every request ("" = none: the server's only model)."""
        return self.server.model

    @property
    def max_model_len(self) -> int | None:
        """Context length, when /v1/models reports it (vLLM's `max_model_len`)."""
        return self.server.max_model_len

    async def start(self) -> None:
        """Open the connection pool and read `/v1/models` when the server has it (404 is tolerated)."""
        await self.server.start()
        log.info(
            "openai backend ready",
            extra={
                "url": self.server.api_root,
                "model": self.model or None,
                "max_model_len": self.max_model_len,
                "concurrency": self.concurrency,
            },
        )

    def check_limits(self, *, max_guidance_tokens: int) -> None:
        """Refuse a guidance length the server cannot generate (raises ValueError naming the values)."""
        self.server.check_limits(max_new_tokens=max_guidance_tokens, what="max_guidance_tokens")

    async def generate(self, request: GenerationRequest) -> GenerationResult | BackendError:
        return await self.resilience.call_one(self._attempt, request, limit=self._limit)

    async def generate_batch(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | BackendError]:
        return await self.resilience.call_each(self._attempt, requests, limit=self._limit)

    async def close(self) -> None:
        await self.server.close()

    async def _attempt(self, request: GenerationRequest) -> GenerationResult:
        body: dict[str, Any] = {
            "prompt": [request.prompt],
            "max_tokens": request.max_guidance_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "stream": False,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        try:
            response = await self.server.http.post("completions", json=self.server.body(body))
        except httpx2.TransportError as exc:
            raise transport_error(exc, url=self.server.api_root) from exc
        if response.status_code >= 400:
            raise status_error(response)
        try:
            return _to_result(response.json(), request)
        except (ValueError, TypeError, LookupError, AttributeError) as exc:
            raise malformed(f"unreadable /v1/completions response: {exc}") from exc


def _to_result(payload: Any, request: GenerationRequest) -> GenerationResult:
    """Read choice 0 and the usage; servers should leave the stop string out, some include it."""
    choice = next((c for c in payload["choices"] if c.get("index", 0) == 0), None)
    if choice is None:
        raise ValueError("no choice with index 0")
    text = choice["text"]
    tokens = payload["usage"]["completion_tokens"]
    finish = finish_reason(choice, had_stop=bool(request.stop))
    if not isinstance(text, str) or not isinstance(tokens, int) or tokens < 0 or finish is None:
        raise ValueError(
            f"choice {choice!r:.120} / usage {payload['usage']!r:.80} do not follow the Completion schema"
        )
    cut = first_stop(text, request.stop)
    if cut is not None:
        text, finish = text[:cut], "stop"
    return GenerationResult(text=text, token_count=tokens, finish_reason=finish)
