"""An OpenAI-compatible server (vLLM, SGLang, TGI's `/v1`, llama.cpp, OpenAI): its connection, the model
it serves and its context length (`/v1/models`), and how its completions say why they ended."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import httpx2

from gkt.errors import Unavailable
from gkt.remote.settings import RemoteServerSettings

log = logging.getLogger(__name__)

# OpenAI and vLLM say "stop" for both EOS and a stop string; TGI's compatibility layer may use its own names.
_FINISH_REASONS = {
    "length": "length",
    "stop": "stop",
    "eos_token": "eos",
    "stop_sequence": "stop",
    "eos": "eos",
}


class OpenAIServer:
    """The connection pool to one server and what `/v1/models` says about it."""

    def __init__(self, *, settings: RemoteServerSettings, model: str, connections: int) -> None:
        self._settings = settings
        self._prefix = str(settings.model_config.get("env_prefix", ""))
        base = str(settings.url).rstrip("/")
        # Accept both the server root and the OpenAI-style base URL that already ends in /v1.
        self.api_root = base if base.endswith("/v1") else f"{base}/v1"
        self._connections = connections
        self._http: httpx2.AsyncClient | None = None
        self.model = model
        """The model name sent with every request ("" = none: the server's only model)."""
        self.max_model_len: int | None = None
        """Context length, when /v1/models reports it (vLLM's `max_model_len`)."""

    @property
    def http(self) -> httpx2.AsyncClient:
        if self._http is None:
            raise RuntimeError("OpenAIServer.start() was not awaited")
        return self._http

    async def start(self) -> None:
        """Open the connection pool and read `/v1/models` when the server has it (404 is tolerated)."""
        key = self._settings.read_api_key()
        headers = {"authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}
        self._http = httpx2.AsyncClient(
            base_url=self.api_root,
            headers=headers,
            timeout=httpx2.Timeout(self._settings.request_timeout_s),
            limits=httpx2.Limits(
                max_connections=self._connections, max_keepalive_connections=self._connections
            ),
        )
        try:
            await self._discover_model()
        except BaseException:
            await self.close()
            raise

    def check_limits(self, *, max_new_tokens: int, what: str) -> None:
        """Refuse a length the server cannot generate (raises ValueError naming the values)."""
        if max_new_tokens < 1:
            raise ValueError(f"{what} ({max_new_tokens}) must be >= 1")
        if self.max_model_len is not None and max_new_tokens >= self.max_model_len:
            raise ValueError(
                f"{what} ({max_new_tokens}) leaves no room for the prompt: model "
                f"{self.model!r} has max_model_len {self.max_model_len}"
            )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def body(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A request body: `fields` with the model name when one is set."""
        return {"model": self.model, **fields} if self.model else fields

    async def _discover_model(self) -> None:
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                response = await self.http.get("models")
        except (TimeoutError, httpx2.HTTPError) as exc:
            raise Unavailable(
                f"OpenAI-compatible server at {self.api_root}: GET /models failed ({exc!r}); "
                f"is it running at {self._prefix}URL?"
            ) from exc
        if response.status_code == 404:
            log.info("server has no /v1/models; using the model name as given", extra={"url": self.api_root})
            return
        if response.status_code in (401, 403):
            raise ValueError(
                f"{self.api_root}/models answered HTTP {response.status_code}: "
                f"the server rejected the API key ({self._prefix}API_KEY / {self._prefix}API_KEY_FILE)"
            )
        if response.status_code != 200:
            raise Unavailable(f"{self.api_root}/models answered HTTP {response.status_code}")
        entries = _model_entries(response)
        served = [str(e["id"]) for e in entries]
        if self.model and served and self.model not in served:
            raise ValueError(
                f"{self._prefix}MODEL ({self.model!r}) is not served by {self.api_root}: it serves {served}"
            )
        if not self.model:
            if len(served) != 1:
                raise ValueError(
                    f"set {self._prefix}MODEL: {self.api_root} serves {len(served)} models: {served[:20]}"
                )
            self.model = served[0]
        entry = next((e for e in entries if e["id"] == self.model), {})
        max_len = entry.get("max_model_len")
        self.max_model_len = max_len if isinstance(max_len, int) and max_len > 0 else None


def finish_reason(choice: Mapping[str, Any], *, had_stop: bool) -> str | None:
    """ "length", "stop" or "eos" from a completion choice; None when it does not say (or says nothing
    known). vLLM's `stop_reason` tells EOS (None) from a stop string; servers without it say "stop" for
    both, and without stop sequences it can only have been EOS."""
    reason = choice.get("finish_reason")
    finish = _FINISH_REASONS.get(reason) if isinstance(reason, str) else None
    if reason == "stop" and "stop_reason" in choice:
        return "eos" if choice["stop_reason"] is None else "stop"
    if reason == "stop":
        return "stop" if had_stop else "eos"
    return finish


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
