"""The `openai` backend: OpenAI-compatible `/v1/completions` (vLLM, SGLang, TGI, llama.cpp, OpenAI)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import httpx2

from gkt.errors import StatusCode, Unavailable
from services.teacher.backends.base import BackendError, GenerationRequest, GenerationResult
from services.teacher.backends.remote import (
    AttemptError,
    RemoteBackendSettings,
    classify_status,
    parse_retry_after,
)
from services.teacher.backends.resilience import ResilientCaller

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 32
_DETAIL_CHARS = 300
# OpenAI and vLLM say "stop" for both EOS and a stop string; TGI's compatibility layer may use its own names.
_FINISH_REASONS = {
    "length": "length",
    "stop": "stop",
    "eos_token": "eos",
    "stop_sequence": "stop",
    "eos": "eos",
}


class OpenAIBackend:
    """Sends a batch as concurrent single-prompt completions, so one bad prompt fails only its own job."""

    name = "openai"

    def __init__(self, *, settings: RemoteBackendSettings, model: str = "") -> None:
        self._settings = settings
        base = str(settings.url).rstrip("/")
        # Accept both the server root and the OpenAI-style base URL that already ends in /v1.
        self._api_root = base if base.endswith("/v1") else f"{base}/v1"
        self._http: httpx2.AsyncClient | None = None
        self._limit: asyncio.Semaphore | None = None
        self.model = model
        """The model name sent with every request (GKT_TEACHER_MODEL; "" = the server's only model)."""
        self.max_model_len: int | None = None
        """Context length, when /v1/models reports it (vLLM's `max_model_len`)."""
        self.concurrency = settings.max_concurrency or DEFAULT_CONCURRENCY
        self.resilience = ResilientCaller(settings=settings, backend_name=self.name)

    async def start(self) -> None:
        """Open the connection pool and read `/v1/models` when the server has it (404 is tolerated)."""
        key = self._settings.read_api_key()
        headers = {"authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}
        self._http = httpx2.AsyncClient(
            base_url=self._api_root,
            headers=headers,
            timeout=httpx2.Timeout(self._settings.request_timeout_s),
            limits=httpx2.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            ),
        )
        self._limit = asyncio.Semaphore(self.concurrency)
        try:
            await self._discover_model()
        except BaseException:
            await self.close()
            raise
        log.info(
            "openai backend ready",
            extra={
                "url": self._api_root,
                "model": self.model or None,
                "max_model_len": self.max_model_len,
                "concurrency": self.concurrency,
            },
        )

    def check_limits(self, *, max_guidance_tokens: int) -> None:
        """Refuse a guidance length the server cannot generate (raises ValueError naming the values)."""
        if max_guidance_tokens < 1:
            raise ValueError(f"max_guidance_tokens ({max_guidance_tokens}) must be >= 1")
        if self.max_model_len is not None and max_guidance_tokens >= self.max_model_len:
            raise ValueError(
                f"max_guidance_tokens ({max_guidance_tokens}) leaves no room for the prompt: model "
                f"{self.model!r} has max_model_len {self.max_model_len}"
            )

    async def generate_batch(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | BackendError]:
        if self._http is None or self._limit is None:
            raise RuntimeError("OpenAIBackend.start() was not awaited")
        return await self.resilience.call_each(self._attempt, requests, limit=self._limit)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _discover_model(self) -> None:
        assert self._http is not None
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                response = await self._http.get("models")
        except (TimeoutError, httpx2.HTTPError) as exc:
            raise Unavailable(
                f"OpenAI-compatible server at {self._api_root}: GET /models failed ({exc!r}); "
                "is it running at GKT_TEACHER_URL?"
            ) from exc
        if response.status_code == 404:
            log.info(
                "server has no /v1/models; using GKT_TEACHER_MODEL as given", extra={"url": self._api_root}
            )
            return
        if response.status_code in (401, 403):
            raise ValueError(
                f"{self._api_root}/models answered HTTP {response.status_code}: "
                "the server rejected the API key (GKT_TEACHER_API_KEY / GKT_TEACHER_API_KEY_FILE)"
            )
        if response.status_code != 200:
            raise Unavailable(f"{self._api_root}/models answered HTTP {response.status_code}")
        entries = _model_entries(response)
        served = [str(e["id"]) for e in entries]
        if self.model and served and self.model not in served:
            raise ValueError(
                f"GKT_TEACHER_MODEL ({self.model!r}) is not served by {self._api_root}: it serves {served}"
            )
        if not self.model:
            if len(served) != 1:
                raise ValueError(
                    f"set GKT_TEACHER_MODEL: {self._api_root} serves {len(served)} models: {served[:20]}"
                )
            self.model = served[0]
        entry = next((e for e in entries if e["id"] == self.model), {})
        max_len = entry.get("max_model_len")
        self.max_model_len = max_len if isinstance(max_len, int) and max_len > 0 else None

    async def _attempt(self, request: GenerationRequest) -> GenerationResult:
        assert self._http is not None
        body: dict[str, Any] = {
            "prompt": [request.prompt],
            "max_tokens": request.max_guidance_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "stream": False,
        }
        if self.model:
            body["model"] = self.model
        if request.stop:
            body["stop"] = list(request.stop)
        try:
            response = await self._http.post("completions", json=body)
        except httpx2.TimeoutException as exc:
            raise AttemptError(
                f"timed out: {exc!r}", kind="timeout", code=StatusCode.UNAVAILABLE, server_fault=True
            ) from exc
        except httpx2.TransportError as exc:
            raise AttemptError(
                f"cannot reach {self._api_root}: {exc!r}",
                kind="connection",
                code=StatusCode.UNAVAILABLE,
                retryable=True,
                server_fault=True,
            ) from exc
        if response.status_code >= 400:
            raise classify_status(
                status=response.status_code,
                detail=_error_detail(response),
                retry_after_s=parse_retry_after(response.headers.get("retry-after")),
            )
        try:
            return _to_result(response.json(), request)
        except (ValueError, TypeError, LookupError, AttributeError) as exc:
            raise AttemptError(
                _short(f"unreadable /v1/completions response: {exc}"),
                kind="malformed",
                code=StatusCode.INTERNAL,
                server_fault=True,
            ) from exc


def _to_result(payload: Any, request: GenerationRequest) -> GenerationResult:
    """Read choice 0 and the usage; tell EOS from a stop string where the server says which (vLLM)."""
    choice = next((c for c in payload["choices"] if c.get("index", 0) == 0), None)
    if choice is None:
        raise ValueError("no choice with index 0")
    text = choice["text"]
    tokens = payload["usage"]["completion_tokens"]
    reason = choice.get("finish_reason")
    finish = _FINISH_REASONS.get(reason)
    if not isinstance(text, str) or not isinstance(tokens, int) or tokens < 0 or finish is None:
        raise ValueError(
            f"choice {choice!r:.120} / usage {payload['usage']!r:.80} do not follow the Completion schema"
        )
    if reason == "stop" and "stop_reason" in choice:
        # vLLM's stop_reason is None for EOS and the matched string (or token id) otherwise.
        finish = "eos" if choice["stop_reason"] is None else "stop"
    elif reason == "stop":
        # Other servers say "stop" for both; without stop sequences it can only have been EOS.
        finish = "stop" if request.stop else "eos"
    text, cut = _cut_at_stop(text, request.stop)
    return GenerationResult(text=text, token_count=tokens, finish_reason="stop" if cut else finish)


def _model_entries(response: httpx2.Response) -> list[dict[str, Any]]:
    """OpenAI and vLLM list models under `data`; TGI returns one ModelInfo object."""
    try:
        body = response.json()
        entries = body["data"] if isinstance(body, dict) and "data" in body else [body]
        if all(isinstance(e, dict) and isinstance(e.get("id"), str) for e in entries):
            return list(entries)
    except (ValueError, TypeError, LookupError):
        pass
    raise Unavailable(f"{response.url} did not return a model list")


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Servers should leave the stop string out; some include it (vLLM's include_stop_str_in_output)."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def _error_detail(response: httpx2.Response) -> str:
    """The error text: TGI `{"error": str}`, OpenAI `{"error": {"message": str}}`, vLLM `{"message"}`."""
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    if not isinstance(error, str) and isinstance(body, dict):
        error = body.get("message")
    return _short(error) if isinstance(error, str) else response.reason_phrase


def _short(text: str) -> str:
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + "…"
