"""The `openai` student backend: `stream: true` completions from an OpenAI-compatible server (vLLM,
llama.cpp's server, SGLang, TGI's `/v1`)."""

from __future__ import annotations

import logging
from typing import Any

from gkt.errors import StatusCode
from gkt.remote.errors import AttemptError, malformed
from gkt.remote.openai import OpenAIServer, finish_reason
from gkt.remote.resilience import ResilientCaller
from gkt.remote.sse import EventStream
from services.student.backends.base import StudentRequest
from services.student.backends.remote import Piece, invalid_field
from services.student.settings import StudentServerSettings

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
"""The OpenAI API takes at most four stop strings; the others are applied to the text as it streams."""


class OpenAIClient:
    """Sends the job's sampling as the completions API names it; top_k and repetition_penalty (vLLM,
    llama.cpp and SGLang take them; OpenAI itself does not) only when the job sets them."""

    name = "openai"

    def __init__(self, *, settings: StudentServerSettings, model: str = "", connections: int) -> None:
        self.server = OpenAIServer(settings=settings, model=model, connections=connections)
        self.resilience = ResilientCaller(
            settings=settings, name="student backend openai", invalid_field=invalid_field
        )

    async def start(self) -> None:
        await self.server.start()
        log.info(
            "openai student backend ready",
            extra={
                "url": self.server.api_root,
                "model": self.server.model or None,
                "max_model_len": self.server.max_model_len,
            },
        )

    def check_limits(self, *, max_new_tokens: int, max_batch: int) -> None:
        self.server.check_limits(max_new_tokens=max_new_tokens, what="GKT_STUDENT_MAX_NEW_TOKENS")

    async def open(self, request: StudentRequest) -> _CompletionStream:
        params = request.sampling
        body: dict[str, Any] = {
            "prompt": [request.prompt],
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.stop:
            body["stop"] = list(request.stop[:MAX_STOP_SEQUENCES])
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        events = await EventStream.open(self.server.http, "completions", body=self.server.body(body))
        return _CompletionStream(events, had_stop="stop" in body)

    async def close(self) -> None:
        await self.server.close()


class _CompletionStream:
    """`Completion` chunks as pieces: choice 0's text, its finish reason, and the usage when sent."""

    def __init__(self, events: EventStream, *, had_stop: bool) -> None:
        self._events = events
        self._had_stop = had_stop

    async def next(self) -> Piece | None:
        payload = await self._events.next()
        if payload is None:
            return None
        try:
            return self._piece(payload)
        except (TypeError, LookupError, AttributeError) as exc:
            raise malformed(f"unreadable completion chunk {payload!r:.120}: {exc}") from exc

    def _piece(self, payload: Any) -> Piece:
        error = payload.get("error") if isinstance(payload, dict) else None
        if error is not None or payload.get("object") == "error":
            detail = error.get("message") if isinstance(error, dict) else error or payload.get("message")
            raise AttemptError(
                f"the server failed mid-stream: {detail}",
                kind="server",
                code=StatusCode.UNAVAILABLE,
                server_fault=True,
            )
        usage = payload.get("usage")
        total = usage["completion_tokens"] if isinstance(usage, dict) else None
        choice = next((c for c in payload["choices"] if c.get("index", 0) == 0), None)
        if choice is None:
            return Piece(tokens=0, total_tokens=total)  # the usage chunk, after the last choice
        text = choice["text"]
        if not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}")
        return Piece(
            text=text,
            tokens=1 if text else 0,
            finish=finish_reason(choice, had_stop=self._had_stop),
            total_tokens=total,
        )

    async def aclose(self) -> None:
        await self._events.aclose()
