"""The `tgi` backend: Text Generation Inference's native `/generate` API, through huggingface_hub."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import httpx2
from huggingface_hub import AsyncInferenceClient, TextGenerationOutput
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError, TextGenerationError

from gkt.errors import StatusCode
from gkt.remote.errors import (
    AttemptError,
    BackendError,
    classify_status,
    malformed,
    parse_retry_after,
    short,
    transport_error,
)
from gkt.remote.resilience import ResilientCaller
from gkt.remote.tgi import CLIENT_CONNECTIONS, FINISH_REASONS, TgiInfo, inference_client, read_info
from gkt.stops import first_stop
from services.teacher.backends.base import GenerationRequest, GenerationResult
from services.teacher.settings import TeacherServerSettings

log = logging.getLogger(__name__)


class TgiBackend:
    """Sends each prompt as its own `/generate` request; TGI's continuous batching merges them."""

    name = "tgi"

    def __init__(self, *, settings: TeacherServerSettings) -> None:
        self._settings = settings
        self._base_url = str(settings.url).rstrip("/")
        self._client: AsyncInferenceClient | None = None
        self._limit: asyncio.Semaphore | None = None
        self.info: TgiInfo | None = None
        self.concurrency = 0
        self.resilience = ResilientCaller(settings=settings, name="teacher backend tgi")

    async def start(self) -> None:
        """Read `/info` and `/health`; refuse an unreachable, unhealthy or too-small server."""
        self._client = inference_client(self._settings)
        try:
            await self._check_server(self._client)
        except BaseException:
            await self.close()
            raise

    def check_limits(self, *, max_guidance_tokens: int) -> None:
        """Refuse a guidance length the server cannot generate (raises ValueError naming the values)."""
        if self.info is None:
            raise RuntimeError("TgiBackend.start() was not awaited")
        room = self.info.check_limits(max_new_tokens=max_guidance_tokens, what="max_guidance_tokens")
        log.info(
            "tgi limits checked: longer prompts will fail with INVALID_ARGUMENT",
            extra={"max_guidance_tokens": max_guidance_tokens, "max_prompt_tokens": room},
        )

    async def generate(self, request: GenerationRequest) -> GenerationResult | BackendError:
        if self._client is None or self._limit is None:
            raise RuntimeError("TgiBackend.start() was not awaited")
        return await self.resilience.call_one(self._attempt, request, limit=self._limit)

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
        info = await read_info(client, settings=self._settings)
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
        except InferenceTimeoutError as exc:
            raise AttemptError(
                f"timed out: {exc}", kind="timeout", code=StatusCode.UNAVAILABLE, server_fault=True
            ) from exc
        except httpx2.TransportError as exc:
            raise transport_error(exc, url=self._base_url) from exc
        except (ValueError, TypeError, LookupError, AttributeError) as exc:  # unparsable body
            raise malformed(f"unreadable /generate response: {exc}") from exc
        return _to_result(output, request)


def _to_result(output: object, request: GenerationRequest) -> GenerationResult:
    """Check the response shape, map TGI's finish reason and cut the text before the first stop sequence
    (TGI returns the stop sequence inside generated_text; guidance ends before it)."""
    if not isinstance(output, TextGenerationOutput) or not isinstance(output.generated_text, str):
        raise malformed(f"/generate returned {type(output).__name__}, not TGI's GenerateResponse")
    details = output.details
    if details is None:
        raise malformed("/generate returned no details although details=true was sent")
    finish = FINISH_REASONS.get(str(details.finish_reason))
    tokens = details.generated_tokens
    if finish is None or not isinstance(tokens, int) or tokens < 0:
        raise malformed(f"/generate details are unreadable: {details.finish_reason!r}, {tokens!r}")
    text = output.generated_text
    cut = first_stop(text, request.stop)
    if cut is not None:
        text, finish = text[:cut], "stop"
    return GenerationResult(text=text, token_count=tokens, finish_reason=finish)


def _status_error(cause: BaseException | None, *, detail: str) -> AttemptError:
    if not isinstance(cause, HfHubHTTPError):
        return AttemptError(
            short(detail), kind="server", code=StatusCode.UNAVAILABLE, retryable=True, server_fault=True
        )
    response = cause.response
    return classify_status(
        status=response.status_code,
        detail=short(detail),
        retry_after_s=parse_retry_after(response.headers.get("retry-after")),
    )
