"""A test HTTP server that follows TGI's published API and the OpenAI completions schema.

TGI (and vLLM) need a GPU and a model hub, neither of which exists here, so the remote backends are
tested against this server instead: it speaks TGI's documented routes (`/generate`, `/generate_stream`,
`/info`, `/health`, `/v1/completions` with and without `stream: true`, `/v1/models`), enforces TGI's
request validation rules, and can be scripted to answer 429, 503, malformed bodies, slow, held or dropped
replies, and streams that die after some tokens. It notes a client that hangs up mid-stream. `PublishedApi`
checks every request it received and every JSON reply or streamed event it sent against the schemas in
TGI's OpenAPI document (`../shared/ref/tgi-openapi.json`).
Its length is both APIs' routes, streamed and not, and TGI's validation rules, which the teacher's and the
students' backend tests share: a test double is clearest read in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, cast

import pytest
from openapi_schema_validator import OAS30Validator

from gkt_tools.settings import ToolSettings
from services.teacher.settings import TeacherServerSettings
from tests.integration.fake_streams import completion_chunks, tgi_events

REF_DIR = ToolSettings().shared_ref_dir
OPENAPI_FILE = REF_DIR / "tgi-openapi.json"

DEFAULT_INFO: dict[str, Any] = {
    "model_id": "fake-org/teacher-13b",
    "model_sha": None,
    "model_pipeline_tag": "text-generation",
    "max_concurrent_requests": 128,
    "max_best_of": 2,
    "max_stop_sequences": 4,
    "max_input_tokens": 1024,
    "max_total_tokens": 2048,
    "validation_workers": 2,
    "max_client_batch_size": 4,
    "router": "text-generation-router",
    "version": "3.3.6-dev0",
    "sha": None,
    "docker_label": None,
}
_TOKEN = re.compile(r"\s*\S+")
_ERROR_TYPES = {
    401: "authentication",
    404: "not_found",
    422: "validation",
    424: "generation",
    429: "overloaded",
    500: "incomplete_generation",
    503: "healthcheck",
}
_ERROR_TEXT = {429: "Model is overloaded", 500: "Incomplete generation", 503: "unhealthy"}


@dataclass(frozen=True, kw_only=True)
class Reply:
    """A scripted answer to one generation request."""

    status: int = 200
    body: dict[str, Any] | bytes | None = None  # None: generate normally (200) or TGI's ErrorResponse
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection without answering
    gate: threading.Event | None = None  # hold the answer until the test sets this event
    drop_after_tokens: int | None = None  # a stream: send this many tokens, then cut the connection
    events: tuple[Any, ...] | None = None  # a stream: the events to send (filled in by the server)


@dataclass(frozen=True, kw_only=True)
class Exchange:
    """One request the server received and what it answered."""

    method: str
    path: str
    request_json: Any
    headers: dict[str, str]
    status: int = 0  # 0 until the server has answered
    response_json: Any = None  # None when the reply was not JSON (scripted raw bytes, a dropped connection)
    events: tuple[Any, ...] = ()  # a stream's events sent so far
    hung_up: bool = False  # the client closed a stream before its end


def tokenize(text: str) -> list[str]:
    """The fake model's tokenizer: one token per word, with its leading whitespace."""
    return _TOKEN.findall(text)


def continuation(prompt: str) -> str:
    """What the fake model always says after `prompt`: it names the last question's last word, then asks on."""
    questions = re.findall(r"Q:(.*)", prompt) or [prompt]
    words = re.findall(r"\w+", questions[-1])
    topic = words[-1] if words else "it"
    return f" {topic} is easy. The answer is 42.\nQ: What comes next?"


class FakeInferenceServer:
    """TGI's and the OpenAI completions API on 127.0.0.1 (a free port), in a background thread."""

    def __init__(
        self,
        *,
        info: dict[str, Any] | None = None,
        models: list[str] | None = None,
        models_format: Literal["openai", "tgi", "absent"] = "openai",
        api_key: str | None = None,
        generation_delay_s: float = 0.0,
        hold_until_in_flight: int = 0,
        stop_reason_field: bool = True,
        token_delay_s: float = 0.0,
    ) -> None:
        self.info = {**DEFAULT_INFO, **(info or {})}
        self.models = models if models is not None else [self.info["model_id"]]
        self.models_format = models_format
        self.api_key = api_key
        self.generation_delay_s = generation_delay_s
        # Generation requests wait (at most a second) until this many were in flight at once: a test of
        # concurrency then sees the overlap without depending on timing.
        self.hold_until_in_flight = hold_until_in_flight
        self._enough_in_flight = threading.Event()
        self.stop_reason_field = stop_reason_field  # vLLM reports it; llama.cpp and OpenAI do not
        self.token_delay_s = token_delay_s  # between two streamed tokens
        self.healthy = True
        self.exchanges: list[Exchange] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._scripts: list[tuple[str, deque[Reply]]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def script(self, match: str, *replies: Reply) -> None:
        """Answer the next generation requests whose prompt contains `match` with `replies`, in order."""
        with self._lock:
            self._scripts.append((match, deque(replies)))

    def generation_requests(self, match: str = "") -> list[Exchange]:
        """The generation requests received (either API) whose prompt contains `match`."""
        with self._lock:
            return [e for e in self.exchanges if e.path in _GENERATION_PATHS and match in _prompt(e)]

    def exchange(self, index: int) -> Exchange:
        with self._lock:
            return self.exchanges[index]

    def start(self) -> FakeInferenceServer:
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False
        httpd.fake = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection, as a crashed server would."""
        if self._httpd is None:
            return
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections, self._connections = set(self._connections), set()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None

    def __enter__(self) -> FakeInferenceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling (runs on the server's threads) --

    def serve(self, handler: _Handler) -> None:
        """Answer one request (called by the handler thread)."""
        method, path = handler.command, handler.path.split("?")[0]
        raw = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        request = json.loads(raw) if raw else None
        headers = {k.lower(): v for k, v in handler.headers.items()}
        # Recorded on arrival, so a test can see a request the server is still holding.
        index = self._record(Exchange(method=method, path=path, request_json=request, headers=headers))
        needs_key = self.api_key is not None and path != "/health"
        if needs_key and headers.get("authorization") != f"Bearer {self.api_key}":
            reply = _error(401, "Unauthorized")
        elif (method, path) == ("GET", "/info"):
            reply = Reply(body=self.info)
        elif (method, path) == ("GET", "/health"):
            reply = Reply(status=200, body=b"") if self.healthy else _error(503)
        elif (method, path) == ("GET", "/v1/models"):
            reply = self._models()
        elif method == "POST" and path in _GENERATION_PATHS:
            self._enter()
            try:
                reply = self._generation(path=path, request=request)
                if self.hold_until_in_flight:
                    self._enough_in_flight.wait(timeout=1.0)
                self._closing.wait(reply.delay_s or self.generation_delay_s)
                if reply.gate is not None:
                    while not reply.gate.wait(0.05) and not self._closing.is_set():
                        pass
                if reply.events is not None:
                    self._stream(handler, index, reply)
                    return
            finally:
                self._leave()
        else:
            reply = _error(404, f"no route {method} {path}")
        with self._lock:
            self.exchanges[index] = dataclasses.replace(
                self.exchanges[index],
                status=reply.status,
                response_json=reply.body if isinstance(reply.body, dict) and not reply.drop else None,
            )
        handler.send(reply)

    def _generation(self, *, path: str, request: Any) -> Reply:
        prompt = _prompt_of(request)
        with self._lock:
            for match, replies in self._scripts:
                if match in prompt and replies:
                    scripted = replies.popleft()
                    break
            else:
                scripted = Reply()
        streaming = path == "/generate_stream" or (isinstance(request, dict) and bool(request.get("stream")))
        if scripted.status != 200 and scripted.body is None:
            scripted = dataclasses.replace(scripted, body=_error(scripted.status).body)
        if scripted.body is not None or scripted.drop:
            return _as_stream_error(scripted) if path == "/generate_stream" else scripted
        problem = self._validate(path=path, request=request)
        if problem is not None:
            error = _error(422, problem)
            return _as_stream_error(error) if path == "/generate_stream" else error
        if streaming:
            return dataclasses.replace(scripted, events=tuple(self._events(path=path, request=request)))
        build = self._generate if path == "/generate" else self._complete
        return dataclasses.replace(scripted, body=build(request))

    def _validate(self, *, path: str, request: dict[str, Any]) -> str | None:
        """TGI's own validation rules (router/src/validation.rs), which the schema does not state."""
        if path in ("/generate", "/generate_stream"):
            params = request.get("parameters") or {}
            new_tokens = params.get("max_new_tokens", 100)
            temperature, top_p, stop = (
                params.get("temperature"),
                params.get("top_p"),
                params.get("stop") or [],
            )
            prompt = request["inputs"]
        else:
            new_tokens = request.get("max_tokens", 100)
            temperature, top_p, stop = None, None, request.get("stop") or []
            prompt = _prompt_of(request)
            model = request.get("model")
            if model is not None and self.models_format != "absent" and model not in self.models:
                return f"model {model!r} is not served"
        input_tokens = len(tokenize(prompt))
        if new_tokens is not None and new_tokens < 1:
            return "Input validation error: `max_new_tokens` must be strictly positive"
        if temperature is not None and temperature <= 0:
            return "Input validation error: `temperature` must be strictly positive"
        if top_p is not None and not 0 < top_p < 1:
            return "Input validation error: `top_p` must be > 0.0 and < 1.0"
        if len(stop) > self.info["max_stop_sequences"]:
            return (
                f"Input validation error: `stop` supports up to {self.info['max_stop_sequences']} sequences"
            )
        if input_tokens > self.info["max_input_tokens"]:
            return (
                f"Input validation error: `inputs` must have less than {self.info['max_input_tokens']} tokens"
            )
        if input_tokens + (new_tokens or 0) > self.info["max_total_tokens"]:
            return (
                "Input validation error: `inputs` tokens + `max_new_tokens` must be <= "
                f"{self.info['max_total_tokens']}. Given: {input_tokens} `inputs` tokens and {new_tokens} "
                "`max_new_tokens`"
            )
        return None

    def _generate(self, request: dict[str, Any]) -> dict[str, Any]:
        params = request.get("parameters") or {}
        tokens, finish = _decode(
            request["inputs"], params.get("max_new_tokens", 100), params.get("stop") or []
        )
        # TGI keeps the matched stop sequence in generated_text.
        return {
            "generated_text": "".join(tokens),
            "details": {
                "finish_reason": finish,
                "generated_tokens": len(tokens),
                "seed": params.get("seed") if params.get("do_sample") else None,
                "prefill": [],
                "tokens": [
                    {"id": i + 1, "text": t, "logprob": -0.25, "special": False} for i, t in enumerate(tokens)
                ],
            },
        }

    def _complete(self, request: dict[str, Any]) -> dict[str, Any]:
        prompt, stop = _prompt_of(request), request.get("stop") or []
        tokens, finish = _decode(prompt, request.get("max_tokens", 100), stop)
        text = "".join(tokens)
        matched = next((s for s in stop if s in text), None)
        if matched is not None:
            text = text[: text.index(matched)]  # OpenAI leaves the stop string out
        choice: dict[str, Any] = {
            "index": 0,
            "text": text,
            "finish_reason": "length" if finish == "length" else "stop",
        }
        if self.stop_reason_field:
            choice["stop_reason"] = matched
        return {
            "id": f"cmpl-{len(self.exchanges)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.get("model") or self.info["model_id"],
            "system_fingerprint": f"{self.info['version']}-fake",
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(tokenize(prompt)),
                "completion_tokens": len(tokens),
                "total_tokens": len(tokenize(prompt)) + len(tokens),
            },
        }

    def _events(self, *, path: str, request: dict[str, Any]) -> list[dict[str, Any]]:
        if path == "/generate_stream":
            params = request.get("parameters") or {}
            tokens, finish = _decode(
                request["inputs"], params.get("max_new_tokens", 100), params.get("stop") or []
            )
            return tgi_events(tokens, finish, seed=params.get("seed") if params.get("do_sample") else None)
        prompt, stop = _prompt_of(request), request.get("stop") or []
        tokens, finish = _decode(prompt, request.get("max_tokens", 100), stop)
        return completion_chunks(
            tokens,
            finish,
            stop=stop,
            model=request.get("model") or self.info["model_id"],
            fingerprint=f"{self.info['version']}-fake",
            stop_reason_field=self.stop_reason_field,
            prompt_tokens=len(tokenize(prompt)),
            include_usage=bool((request.get("stream_options") or {}).get("include_usage")),
        )

    def _stream(self, handler: _Handler, index: int, reply: Reply) -> None:
        """Send `reply.events` as server-sent events, one per token interval; note a client that hangs up."""
        assert reply.events is not None
        with self._lock:
            self.exchanges[index] = dataclasses.replace(self.exchanges[index], status=reply.status)
        sent: list[Any] = []
        for number, event in enumerate(reply.events):
            if reply.drop_after_tokens is not None and number >= reply.drop_after_tokens:
                handler.cut()
                break
            if number and self._closing.wait(self.token_delay_s):
                handler.cut()
                break
            if not handler.send_event(event, first=number == 0):
                with self._lock:
                    self.exchanges[index] = dataclasses.replace(self.exchanges[index], hung_up=True)
                return
            sent.append(event)
            with self._lock:
                self.exchanges[index] = dataclasses.replace(self.exchanges[index], events=tuple(sent))
        else:
            if not handler.end_events(done=handler.path != "/generate_stream"):
                with self._lock:
                    self.exchanges[index] = dataclasses.replace(self.exchanges[index], hung_up=True)

    def _models(self) -> Reply:
        created = int(time.time())
        entries = [
            {
                "id": m,
                "object": "model",
                "created": created,
                "owned_by": "fake",
                "max_model_len": self.info["max_total_tokens"],
            }
            for m in self.models
        ]
        if self.models_format == "absent":
            return _error(404, "Not Found")
        if self.models_format == "tgi":
            return Reply(body={k: v for k, v in entries[0].items() if k != "max_model_len"})
        return Reply(body={"object": "list", "data": entries})

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            if self.hold_until_in_flight and self._in_flight >= self.hold_until_in_flight:
                self._enough_in_flight.set()

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _record(self, exchange: Exchange) -> int:
        with self._lock:
            self.exchanges.append(exchange)
            return len(self.exchanges) - 1

    def track_connection(self, conn: socket.socket, *, is_open: bool) -> None:
        """Remember open connections, so `stop()` can cut them as a crash would."""
        with self._lock:
            if is_open:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # a whole batch connects at once; the default backlog of 5 would serialize it

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that closed its kept-alive connection is no error; anything else is printed."""
        if not isinstance(sys.exc_info()[1], ConnectionResetError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TGI's router serves it
    timeout = 5  # idle keep-alive connections end on their own

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as two writes: without this, Nagle + delayed ACK add 40 ms a reply.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._fake.track_connection(self.connection, is_open=True)

    def finish(self) -> None:
        self._fake.track_connection(self.connection, is_open=False)
        super().finish()

    @property
    def _fake(self) -> FakeInferenceServer:
        return cast(FakeInferenceServer, self.server.fake)  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._fake.serve(self)

    do_POST = do_GET

    def send(self, reply: Reply) -> None:
        if reply.drop:
            self.close_connection = True
            return
        body = json.dumps(reply.body).encode() if isinstance(reply.body, dict) else (reply.body or b"")
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) first
            self.close_connection = True

    def send_event(self, event: Any, *, first: bool) -> bool:
        """One server-sent event as one HTTP chunk (the headers before the first); False when the client
        has hung up."""
        try:
            if first:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
            self._chunk(f"data: {json.dumps(event)}\n\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return False
        return True

    def end_events(self, *, done: bool) -> bool:
        """End the stream (OpenAI's `[DONE]` first); False when the client has hung up."""
        try:
            if done:
                self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return False
        return True

    def cut(self) -> None:
        """Close the connection mid-stream, as a server that dies would."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: pytest shows failures, not every request line."""


class PublishedApi:
    """TGI's published OpenAPI document as validators for its request and response schemas."""

    def __init__(self, document: dict[str, Any]) -> None:
        self._components = document["components"]

    @classmethod
    def load(cls) -> PublishedApi:
        """Read the document from $GKT_SHARED_REF_DIR (default ../shared/ref), or skip the calling test with the reason."""
        if not OPENAPI_FILE.is_file():
            pytest.skip(
                f"TGI's OpenAPI document is not at {OPENAPI_FILE}: without it the fake server cannot be "
                "checked against the published API, so the backend tests do not run"
            )
        return cls(json.loads(OPENAPI_FILE.read_text(encoding="utf-8")))

    def errors(self, schema: str, instance: Any) -> list[str]:
        validator = OAS30Validator({"$ref": f"#/components/schemas/{schema}", "components": self._components})
        return [f"{schema}: {e.message}" for e in validator.iter_errors(instance)]

    def _event_errors(self, path: str, event: Any) -> list[str]:
        if isinstance(event, dict) and "error" in event:
            return self.errors("ErrorResponse", event)
        if path == "/generate_stream":
            return self.errors("StreamResponse", event)
        # The discriminator of `Completion` cannot be resolved (see below): a streamed one is a Chunk.
        object_ok = [] if event.get("object") == "text_completion" else ["Chunk: object != text_completion"]
        return self.errors("Chunk", event) + object_ok

    def check(self, exchange: Exchange) -> list[str]:
        """Schema problems of one exchange: the request body and any JSON reply."""
        request_schema, ok_schema = _SCHEMAS.get((exchange.method, exchange.path), (None, None))
        problems = self.errors(request_schema, exchange.request_json) if request_schema else []
        body = exchange.response_json
        if body is None:
            return problems
        if exchange.status >= 400:
            return problems + self.errors("ErrorResponse", body)
        problems += [p for event in exchange.events for p in self._event_errors(exchange.path, event)]
        if exchange.path == "/v1/completions":
            # `Completion` is a oneOf (Chunk | CompletionFinal) with a discriminator that has no mapping,
            # which no validator can resolve; the route's documented 200 JSON schema is CompletionFinal.
            object_ok = (
                [] if body.get("object") == "text_completion" else ["Completion: object != text_completion"]
            )
            return problems + self.errors("CompletionFinal", body) + object_ok
        if exchange.path == "/v1/models" and "data" in body:
            # OpenAI's list form is not in TGI's document; each entry must still be a ModelInfo.
            return problems + [p for entry in body["data"] for p in self.errors("ModelInfo", entry)]
        return problems + (self.errors(ok_schema, body) if ok_schema else [])


_SCHEMAS: dict[tuple[str, str], tuple[str | None, str | None]] = {
    ("POST", "/generate"): ("GenerateRequest", "GenerateResponse"),
    ("POST", "/generate_stream"): ("GenerateRequest", None),
    ("GET", "/info"): (None, "Info"),
    ("POST", "/v1/completions"): ("CompletionRequest", "CompletionFinal"),
    ("GET", "/v1/models"): (None, "ModelInfo"),
}


@contextlib.contextmanager
def published_api_servers() -> Iterator[Callable[..., FakeInferenceServer]]:
    """Yield a factory of started servers; at exit stop them and fail on any exchange off the schema."""
    api = PublishedApi.load()
    servers: list[FakeInferenceServer] = []

    def start(**options: Any) -> FakeInferenceServer:
        server = FakeInferenceServer(**options).start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
    problems = [f"{e.method} {e.path}: {p}" for s in servers for e in s.exchanges for p in api.check(e)]
    assert not problems, "traffic off TGI's published schema:\n" + "\n".join(problems)


_GENERATION_PATHS = ("/generate", "/generate_stream", "/v1/completions")


def free_port() -> int:
    """A port nothing listens on (for the server-down case)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _decode(prompt: str, max_new_tokens: int | None, stop: list[str]) -> tuple[list[str], str]:
    """Greedy decoding of the fake model: TGI's finish reasons, stop checked after every token."""
    out: list[str] = []
    for token in tokenize(continuation(prompt)):
        if max_new_tokens is not None and len(out) >= max_new_tokens:
            return out, "length"
        out.append(token)
        if any(s in "".join(out) for s in stop):
            return out, "stop_sequence"
    return out, "eos_token"


def _as_stream_error(reply: Reply) -> Reply:
    """TGI's router sends the errors it makes itself (validation, overload, a failed generation) as one
    event of a 200 stream; other statuses (503 from a proxy in front of it) stay HTTP statuses."""
    if reply.status in (422, 424, 429, 500) and isinstance(reply.body, dict):
        return dataclasses.replace(reply, status=200, body=None, events=(reply.body,))
    return reply


def _error(status: int, message: str | None = None) -> Reply:
    text = message or _ERROR_TEXT.get(status, HTTPStatus(status).phrase)
    return Reply(status=status, body={"error": text, "error_type": _ERROR_TYPES.get(status, "error")})


def _prompt_of(request: Any) -> str:
    if not isinstance(request, dict):
        return ""
    prompt = request.get("inputs", request.get("prompt", ""))
    return str(prompt[0] if isinstance(prompt, list) and prompt else prompt)


def _prompt(exchange: Exchange) -> str:
    return _prompt_of(exchange.request_json)


ServerFactory = Callable[..., "FakeInferenceServer"]
"""Starts a `FakeInferenceServer` (the `servers` fixture of tests/integration/conftest.py)."""


def fast_teacher_settings(url: str, **overrides: Any) -> TeacherServerSettings:
    """A teacher backend's server settings with small timeouts and backoff, so failure paths take
    milliseconds."""
    values: dict[str, Any] = {
        "url": url,
        "request_timeout_s": 2.0,
        "max_retries": 3,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "breaker_failures": 50,
        "breaker_reset_s": 0.3,
        "api_key": None,
        "api_key_file": None,
    }
    return TeacherServerSettings(**(values | overrides))
