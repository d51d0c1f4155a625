"""The `tgi` backend: Text Generation Inference's native `/generate` API, through huggingface_hub."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import httpx2
from huggingface_hub import AsyncInferenceClient, TextGenerationOutput
from huggingface_hub.errors import (
    HfHubHTTPError,
    InferenceTimeoutError,
    OfflineModeIsEnabled,
    TextGenerationError,
)
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

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

T = TypeVar("T")
_FINISH_REASONS = {"length": "length", "eos_token": "eos", "stop_sequence": "stop"}
_DETAIL_CHARS = 300
# huggingface_hub's async HTTP client pools at most 100 connections; more requests in flight would queue
# inside the client, where the wait counts against the request timeout.
CLIENT_CONNECTIONS = 100


class TgiInfo(BaseModel):
    """The part of TGI's `GET /info` the teacher relies on."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model_id: str
    version: str
    max_concurrent_requests: int = Field(ge=0)
    max_stop_sequences: int = Field(ge=0)
    # TGI before 2.1 called it max_input_length.
    max_input_tokens: int = Field(ge=0, validation_alias=AliasChoices("max_input_tokens", "max_input_length"))
    max_total_tokens: int = Field(ge=0)


class TgiBackend:
    """Sends a batch as concurrent `/generate` requests; TGI's continuous batching merges them."""

    name = "tgi"

    def __init__(self, *, settings: RemoteBackendSettings) -> None:
        self._settings = settings
        self._base_url = str(settings.url).rstrip("/")
        self._client: AsyncInferenceClient | None = None
        self._limit: asyncio.Semaphore | None = None
        self.info: TgiInfo | None = None
        self.concurrency = 0
        self.resilience = ResilientCaller(settings=settings, backend_name=self.name)

    async def start(self) -> None:
        """Read `/info` and `/health`; refuse an unreachable, unhealthy or too-small server."""
        key = self._settings.read_api_key()
        self._client = AsyncInferenceClient(
            model=self._base_url,
            provider="hf-inference",
            token=key.get_secret_value() if key is not None else None,
            timeout=self._settings.request_timeout_s,
        )
        try:
            await self._check_server(self._client)
        except BaseException:
            await self.close()
            raise

    def check_limits(self, *, max_guidance_tokens: int) -> None:
        """Refuse a guidance length the server cannot generate (raises ValueError naming the values)."""
        if self.info is None:
            raise RuntimeError("TgiBackend.start() was not awaited")
        if max_guidance_tokens < 1:
            raise ValueError(f"max_guidance_tokens ({max_guidance_tokens}) must be >= 1")
        if max_guidance_tokens >= self.info.max_total_tokens:
            raise ValueError(
                f"max_guidance_tokens ({max_guidance_tokens}) leaves no room for the prompt: the server's "
                f"max_total_tokens is {self.info.max_total_tokens} (TGI --max-total-tokens)"
            )
        room = min(self.info.max_input_tokens, self.info.max_total_tokens - max_guidance_tokens)
        log.info(
            "tgi limits checked: longer prompts will fail with INVALID_ARGUMENT",
            extra={"max_guidance_tokens": max_guidance_tokens, "max_prompt_tokens": room},
        )

    async def generate_batch(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | BackendError]:
        if self._client is None or self._limit is None:
            raise RuntimeError("TgiBackend.start() was not awaited")
        return await self.resilience.call_each(self._attempt, requests, limit=self._limit)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _check_server(self, client: AsyncInferenceClient) -> None:
        payload = await self._startup_call("GET /info", client.get_endpoint_info)
        try:
            info = TgiInfo.model_validate(payload)
        except PydanticValidationError as exc:
            raise Unavailable(f"{self._base_url}/info did not return TGI's Info object: {exc}") from exc
        if not await self._startup_call("GET /health", client.health_check):
            raise Unavailable(f"TGI at {self._base_url} reports unhealthy (GET /health is not 200)")

        wanted = self._settings.max_concurrency
        if wanted > info.max_concurrent_requests:
            raise ValueError(
                f"GKT_TEACHER_MAX_CONCURRENCY ({wanted}) exceeds the server's max_concurrent_requests "
                f"({info.max_concurrent_requests}): TGI would answer the excess with 429"
            )
        self.concurrency = min(wanted or info.max_concurrent_requests, CLIENT_CONNECTIONS)
        if self.concurrency < 1:
            raise ValueError(f"TGI at {self._base_url} reports max_concurrent_requests=0")
        self._limit = asyncio.Semaphore(self.concurrency)
        self.info = info
        log.info(
            "tgi backend ready",
            extra={
                "url": self._base_url,
                "model_id": info.model_id,
                "tgi_version": info.version,
                "max_concurrent_requests": info.max_concurrent_requests,
                "max_input_tokens": info.max_input_tokens,
                "max_total_tokens": info.max_total_tokens,
                "max_stop_sequences": info.max_stop_sequences,
                "concurrency": self.concurrency,
            },
        )

    async def _attempt(self, request: GenerationRequest) -> GenerationResult:
        assert self._client is not None
        # TGI rejects temperature <= 0 and top_p outside (0, 1): greedy is do_sample=False, no knobs.
        sampling = request.temperature > 0
        try:
            output = await self._client.text_generation(
                request.prompt,
                model=f"{self._base_url}/generate",
                details=True,
                max_new_tokens=request.max_guidance_tokens,
                do_sample=sampling,
                temperature=request.temperature if sampling else None,
                top_p=request.top_p if sampling and 0 < request.top_p < 1 else None,
                seed=request.seed,
                stop=list(request.stop) or None,
                return_full_text=False,
            )
        except TextGenerationError as exc:
            raise _status_error(exc.__cause__, detail=str(exc)) from exc
        except HfHubHTTPError as exc:
            raise _status_error(exc, detail=exc.server_message or exc.response.reason_phrase) from exc
        except (InferenceTimeoutError, httpx2.TimeoutException) as exc:
            raise AttemptError(
                f"timed out: {exc}", kind="timeout", code=StatusCode.UNAVAILABLE, server_fault=True
            ) from exc
        except httpx2.TransportError as exc:
            raise AttemptError(
                f"cannot reach {self._base_url}: {exc!r}",
                kind="connection",
                code=StatusCode.UNAVAILABLE,
                retryable=True,
                server_fault=True,
            ) from exc
        except (ValueError, TypeError, LookupError, AttributeError) as exc:  # unparsable body
            raise _malformed(f"unreadable /generate response: {exc}") from exc
        return _to_result(output, request)

    async def _startup_call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                return await call()
        except OfflineModeIsEnabled as exc:
            raise ValueError(
                "huggingface_hub is in offline mode (HF_HUB_OFFLINE=1), which blocks every HTTP call it "
                "makes, including those to your own TGI server: unset HF_HUB_OFFLINE for the teacher"
            ) from exc
        except TimeoutError as exc:
            raise Unavailable(
                f"TGI at {self._base_url}: {what} got no answer within {self._settings.request_timeout_s:g} s"
            ) from exc
        except (httpx2.HTTPError, HfHubHTTPError, ValueError) as exc:
            raise Unavailable(
                f"TGI at {self._base_url}: {what} failed ({_short(repr(exc))}); "
                "is TGI running at GKT_TEACHER_URL?"
            ) from exc


def _to_result(output: object, request: GenerationRequest) -> GenerationResult:
    """Check the response shape, map TGI's finish reason and cut the text before the first stop sequence."""
    if not isinstance(output, TextGenerationOutput) or not isinstance(output.generated_text, str):
        raise _malformed(f"/generate returned {type(output).__name__}, not TGI's GenerateResponse")
    details = output.details
    if details is None:
        raise _malformed("/generate returned no details although details=true was sent")
    finish = _FINISH_REASONS.get(str(details.finish_reason))
    tokens = details.generated_tokens
    if finish is None or not isinstance(tokens, int) or tokens < 0:
        raise _malformed(f"/generate details are unreadable: {details.finish_reason!r}, {tokens!r}")
    text, cut = _cut_at_stop(output.generated_text, request.stop)
    return GenerationResult(text=text, token_count=tokens, finish_reason="stop" if cut else finish)


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """TGI returns the stop sequence inside generated_text; guidance ends before it."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def _status_error(cause: BaseException | None, *, detail: str) -> AttemptError:
    if not isinstance(cause, HfHubHTTPError):
        return AttemptError(
            _short(detail), kind="server", code=StatusCode.UNAVAILABLE, retryable=True, server_fault=True
        )
    response = cause.response
    return classify_status(
        status=response.status_code,
        detail=_short(detail),
        retry_after_s=parse_retry_after(response.headers.get("retry-after")),
    )


def _malformed(message: str) -> AttemptError:
    return AttemptError(_short(message), kind="malformed", code=StatusCode.INTERNAL, server_fault=True)


def _short(text: str) -> str:
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + "…"
