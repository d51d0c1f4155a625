"""Server-sent events, as TGI's `/generate_stream` and OpenAI-compatible `stream: true` completions send
them: an HTTP request whose reply is read one `data:` event at a time."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2

from gkt.errors import StatusCode
from gkt.remote.errors import AttemptError, malformed, status_error, transport_error


class EventStream:
    """One open reply; `next()` returns each event's JSON, None once the stream has ended. Closing it
    closes the connection, which tells the server to stop generating."""

    def __init__(self, response: httpx2.Response, *, url: str) -> None:
        self._response = response
        self._url = url
        self._lines: AsyncIterator[str] = response.aiter_lines()

    @classmethod
    async def open(cls, http: httpx2.AsyncClient, path: str, *, body: dict[str, Any]) -> EventStream:
        """POST `body` to `path`; raises the `AttemptError` of an error status or a failed connection."""
        url = f"{http.base_url}{path}"
        try:
            response = await http.send(http.build_request("POST", path, json=body), stream=True)
        except httpx2.TransportError as exc:
            raise transport_error(exc, url=url) from exc
        if response.status_code >= 400:
            try:
                await response.aread()
            except httpx2.TransportError as exc:
                raise transport_error(exc, url=url) from exc
            finally:
                await response.aclose()
            raise status_error(response)
        return cls(response, url=url)

    async def next(self) -> Any | None:
        """The next event's JSON payload; None after `data: [DONE]` or at the end of the reply."""
        try:
            async for line in self._lines:
                if not line.startswith("data:"):
                    continue  # blank separators, comments (keep-alives), `event:` names
                data = line[5:].strip()
                if data == "[DONE]":
                    return None
                try:
                    return json.loads(data)
                except ValueError as exc:
                    raise malformed(f"unreadable event from {self._url}: {data!r:.120}") from exc
        except httpx2.TransportError as exc:
            raise transport_error(exc, url=self._url) from exc
        return None

    async def aclose(self) -> None:
        await self._response.aclose()


def stream_broken(message: str) -> AttemptError:
    """A stream that ended before the server said why it ended."""
    return AttemptError(
        message, kind="server", code=StatusCode.UNAVAILABLE, retryable=True, server_fault=True
    )
