"""The `tgi` student backend: TGI's native `/generate_stream`, one token per server-sent event.

The stream is read with httpx rather than huggingface_hub's client, whose streams stay open in the
client until the client itself closes: a cancelled job must close its own connection, so that TGI stops
generating for it. `/info` and `/health` are read with huggingface_hub at start-up, as the teacher does.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx2

from gkt.remote.errors import classify_status, malformed
from gkt.remote.resilience import ResilientCaller
from gkt.remote.sse import EventStream
from gkt.remote.tgi import FINISH_REASONS, TgiInfo, inference_client, read_info
from services.student.backends.base import StudentRequest
from services.student.backends.remote import Piece, invalid_field
from services.student.settings import StudentServerSettings

log = logging.getLogger(__name__)

# TGI's router sends its errors, validation and overload included, as an event of the stream.
_ERROR_STATUS = {"validation": 422, "overloaded": 429, "generation": 424, "incomplete_generation": 500}


class TgiClient:
    """Maps the job's sampling to TGI's `GenerateParameters`: greedy is `do_sample: false` without the
    sampling knobs (TGI refuses temperature 0 and top-p 1), sampling sends each one the job sets."""

    name = "tgi"

    def __init__(self, *, settings: StudentServerSettings, connections: int) -> None:
        self._settings = settings
        self._connections = connections
        self.base_url = str(settings.url).rstrip("/")
        self.info: TgiInfo | None = None
        self._http: httpx2.AsyncClient | None = None
        self.resilience = ResilientCaller(
            settings=settings, name="student backend tgi", invalid_field=invalid_field
        )

    async def start(self) -> None:
        client = inference_client(self._settings)
        try:
            self.info = await read_info(client, settings=self._settings)
        finally:
            await client.close()
        key = self._settings.read_api_key()
        self._http = httpx2.AsyncClient(
            base_url=self.base_url,
            headers={"authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {},
            timeout=httpx2.Timeout(self._settings.request_timeout_s),
            limits=httpx2.Limits(
                max_connections=self._connections, max_keepalive_connections=self._connections
            ),
        )
        log.info(
            "tgi student backend ready",
            extra={
                "url": self.base_url,
                "model_id": self.info.model_id,
                "max_total_tokens": self.info.max_total_tokens,
            },
        )

    def check_limits(self, *, max_new_tokens: int, max_batch: int) -> None:
        if self.info is None:
            raise RuntimeError("TgiClient.start() was not awaited")
        self.info.check_limits(max_new_tokens=max_new_tokens, what="GKT_STUDENT_MAX_NEW_TOKENS")
        if max_batch > self.info.max_concurrent_requests:
            raise ValueError(
                f"GKT_STUDENT_MAX_BATCH ({max_batch}) exceeds the server's max_concurrent_requests "
                f"({self.info.max_concurrent_requests}): TGI would answer the excess with 429"
            )

    async def open(self, request: StudentRequest) -> _TokenStream:
        if self._http is None or self.info is None:
            raise RuntimeError("TgiClient.start() was not awaited")
        params = request.sampling
        parameters: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "repetition_penalty": params.repetition_penalty,
            "seed": params.seed,
            "stop": list(request.stop[: self.info.max_stop_sequences]),
            "details": True,
            "return_full_text": False,
            "do_sample": not params.greedy,
        }
        if not params.greedy:
            parameters["temperature"] = params.temperature
            if params.top_p < 1:
                parameters["top_p"] = params.top_p
            if params.top_k > 0:
                parameters["top_k"] = params.top_k
        body = {"inputs": request.prompt, "parameters": parameters, "stream": True}
        return _TokenStream(await EventStream.open(self._http, "/generate_stream", body=body))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


class _TokenStream:
    """`StreamResponse` events as pieces: each token's text (special tokens add none), and the details
    on the last one."""

    def __init__(self, events: EventStream) -> None:
        self._events = events

    async def next(self) -> Piece | None:
        payload = await self._events.next()
        if payload is None:
            return None
        if isinstance(payload, dict) and payload.get("error") is not None:
            status = _ERROR_STATUS.get(str(payload.get("error_type")), 500)
            raise classify_status(status=status, detail=str(payload["error"]))
        try:
            token = payload["token"]
            details = payload.get("details")
            finish = FINISH_REASONS.get(details["finish_reason"]) if details else None
            if details and finish is None:
                raise ValueError(f"finish_reason {details['finish_reason']!r}")
            special = bool(token["special"])
            return Piece(
                text="" if special else str(token["text"]),
                tokens=0 if special else 1,
                finish=finish,
                total_tokens=int(details["generated_tokens"]) if details else None,
            )
        except (ValueError, TypeError, LookupError, AttributeError) as exc:
            raise malformed(f"unreadable /generate_stream event {payload!r:.120}: {exc}") from exc

    async def aclose(self) -> None:
        await self._events.aclose()
