"""A Text Generation Inference server: what its `/info` says, the start-up checks against it, and how its
replies say why generation ended."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx2
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from gkt.errors import Unavailable
from gkt.remote.errors import short
from gkt.remote.settings import RemoteServerSettings

T = TypeVar("T")
FINISH_REASONS = {"length": "length", "eos_token": "eos", "stop_sequence": "stop"}
"""TGI's `FinishReason` as GKT Serve names it."""
CLIENT_CONNECTIONS = 100
"""huggingface_hub's async HTTP client pools at most 100 connections; more requests in flight would queue
inside the client, where the wait counts against the request timeout."""


class TgiInfo(BaseModel):
    """The part of TGI's `GET /info` the workers rely on."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model_id: str
    version: str
    max_concurrent_requests: int = Field(ge=0)
    max_stop_sequences: int = Field(ge=0)
    # TGI before 2.1 called it max_input_length.
    max_input_tokens: int = Field(ge=0, validation_alias=AliasChoices("max_input_tokens", "max_input_length"))
    max_total_tokens: int = Field(ge=0)

    def check_limits(self, *, max_new_tokens: int, what: str) -> int:
        """Refuse a length the server cannot generate (ValueError naming the values); return the longest
        prompt that still fits beside it, in tokens."""
        if max_new_tokens < 1:
            raise ValueError(f"{what} ({max_new_tokens}) must be >= 1")
        if max_new_tokens >= self.max_total_tokens:
            raise ValueError(
                f"{what} ({max_new_tokens}) leaves no room for the prompt: the server's "
                f"max_total_tokens is {self.max_total_tokens} (TGI --max-total-tokens)"
            )
        return min(self.max_input_tokens, self.max_total_tokens - max_new_tokens)


def inference_client(settings: RemoteServerSettings) -> AsyncInferenceClient:
    """huggingface_hub's client for the server at `settings.url`, with its API key."""
    key = settings.read_api_key()
    return AsyncInferenceClient(
        model=str(settings.url).rstrip("/"),
        provider="hf-inference",
        token=key.get_secret_value() if key is not None else None,
        timeout=settings.request_timeout_s,
    )


async def read_info(client: AsyncInferenceClient, *, settings: RemoteServerSettings) -> TgiInfo:
    """`/info`, once `/health` says the server is up; raises Unavailable (or ValueError) saying why not."""
    url = str(settings.url).rstrip("/")
    prefix = settings.model_config.get("env_prefix", "")

    async def call(what: str, request: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(settings.request_timeout_s):
                return await request()
        except OfflineModeIsEnabled as exc:
            raise ValueError(
                "huggingface_hub is in offline mode (HF_HUB_OFFLINE=1), which blocks every HTTP call it "
                "makes, including those to your own TGI server: unset HF_HUB_OFFLINE for this worker"
            ) from exc
        except TimeoutError as exc:
            raise Unavailable(
                f"TGI at {url}: {what} got no answer within {settings.request_timeout_s:g} s"
            ) from exc
        except (httpx2.HTTPError, HfHubHTTPError, ValueError) as exc:
            raise Unavailable(
                f"TGI at {url}: {what} failed ({short(repr(exc))}); is TGI running at {prefix}URL?"
            ) from exc

    payload = await call("GET /info", client.get_endpoint_info)
    try:
        info = TgiInfo.model_validate(payload)
    except PydanticValidationError as exc:
        raise Unavailable(f"{url}/info did not return TGI's Info object: {exc}") from exc
    if not await call("GET /health", client.health_check):
        raise Unavailable(f"TGI at {url} reports unhealthy (GET /health is not 200)")
    return info
