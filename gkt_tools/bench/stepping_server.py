"""A stand-in for a continuously batching inference server (vLLM, TGI), for `gkt bench`'s teacher-pipeline
scenario: an OpenAI-compatible `/v1/completions` whose engine takes a fixed time per step.

Each step lasts `step_ms` whatever it holds and gives every running row one token; at most `rows` rows run
at once, and a request waiting for a row joins at the next step after one frees. A request's length is
the smaller of its `max_tokens` and a natural length drawn from a log-normal spread (median
`median_tokens`, shape `sigma`), or, with `--lengths`, from the lengths a real teacher wrote under that
`max_tokens`; seeded by its prompt: an answer that stops before the guidance limit.
`GET /stats` says how many steps ran and how many rows they carried, to tell how busy it was kept.

    python -m gkt_tools.bench.stepping_server --port 8000 --step-ms 25 --rows 32
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

MODEL = "bench-teacher"


@dataclass
class _Row:
    length: int
    max_tokens: int
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    tokens: int = 0


@dataclass
class SteppingEngine:
    """The scheduler: fixed-time steps over up to `rows` running requests."""

    step_s: float
    rows: int
    median_tokens: float
    sigma: float
    lengths: dict[int, list[int]] = field(default_factory=dict)
    """max_tokens → lengths to draw from (measured ones); other requests draw from the log-normal spread."""
    steps: int = 0
    row_steps: int = 0
    waiting_steps: int = 0
    """Requests left waiting for a row, summed over steps: a server kept full has some at every step."""
    requests: int = 0
    _running: list[_Row] = field(default_factory=list)
    _waiting: list[_Row] = field(default_factory=list)
    _work: asyncio.Event = field(default_factory=asyncio.Event)

    def natural_length(self, prompt: str, *, max_tokens: int) -> int:
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
        if max_tokens in self.lengths:
            return random.Random(seed).choice(self.lengths[max_tokens])
        draw = random.Random(seed).lognormvariate(math.log(self.median_tokens), self.sigma)
        return max(1, round(draw))

    async def generate(self, *, prompt: str, max_tokens: int) -> _Row:
        length = min(max_tokens, self.natural_length(prompt, max_tokens=max_tokens))
        row = _Row(length=length, max_tokens=max_tokens)
        self.requests += 1
        self._waiting.append(row)
        self._work.set()
        await row.done
        return row

    async def run(self) -> None:
        """1) admit waiting rows into free places, 2) one step's time, 3) a token for every row, 4) retire."""
        while True:
            if not self._running and not self._waiting:
                self._work.clear()
                await self._work.wait()
            while self._waiting and len(self._running) < self.rows:
                self._running.append(self._waiting.pop(0))
            await asyncio.sleep(self.step_s)
            self.steps += 1
            self.row_steps += len(self._running)
            self.waiting_steps += len(self._waiting)
            for row in self._running:
                row.tokens += 1
                if row.tokens >= row.length:
                    row.done.set_result(None)
            self._running = [row for row in self._running if not row.done.done()]


async def serve(engine: SteppingEngine, *, host: str, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode().split(" ", 2)
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = json.loads(await reader.readexactly(length)) if length else None
                status, reply = await _route(engine, method, path, body)
                payload = json.dumps(reply).encode()
                writer.write(
                    f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    steps = asyncio.create_task(engine.run())
    server = await asyncio.start_server(handle, host, port, backlog=1024)
    print(f"stepping server on {host}:{port}", flush=True)
    async with server:
        try:
            await server.serve_forever()
        finally:
            steps.cancel()


async def _route(engine: SteppingEngine, method: str, path: str, body: Any) -> tuple[int, Any]:
    if (method, path) == ("GET", "/v1/models"):
        return 200, {"object": "list", "data": [{"id": MODEL, "object": "model", "max_model_len": 8192}]}
    if (method, path) == ("GET", "/stats"):
        counts = {"steps": engine.steps, "row_steps": engine.row_steps, "waiting_steps": engine.waiting_steps}
        return 200, counts | {"requests": engine.requests}
    if (method, path) == ("POST", "/v1/completions"):
        prompt = body["prompt"][0] if isinstance(body["prompt"], list) else body["prompt"]
        row = await engine.generate(prompt=prompt, max_tokens=int(body.get("max_tokens") or 16))
        stopped = row.length < row.max_tokens
        choice = {
            "index": 0,
            "text": " word" * row.length,
            "finish_reason": "stop" if stopped else "length",
            "stop_reason": None,
        }
        usage = {"prompt_tokens": 1, "completion_tokens": row.length, "total_tokens": 1 + row.length}
        return 200, {"id": "cmpl", "object": "text_completion", "created": int(time.time()), "model": MODEL,
                     "choices": [choice], "usage": usage}  # fmt: skip
    return 404, {"error": f"no route {method} {path}"}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gkt_tools.bench.stepping_server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--step-ms", type=float, default=25.0, help="time of one engine step")
    parser.add_argument("--rows", type=int, default=32, help="most requests one step carries")
    parser.add_argument("--median-tokens", type=float, default=20.0, help="median natural answer length")
    parser.add_argument("--sigma", type=float, default=0.6, help="log-normal shape of the natural length")
    parser.add_argument(
        "--lengths",
        type=Path,
        help='JSON {"<max_tokens>": [lengths…]}: draw a request\'s length from those of its max_tokens',
    )
    args = parser.parse_args()
    lengths = json.loads(args.lengths.read_text()) if args.lengths else {}

    async def run() -> None:
        engine = SteppingEngine(
            step_s=args.step_ms / 1000,
            rows=args.rows,
            median_tokens=args.median_tokens,
            sigma=args.sigma,
            lengths={int(limit): [int(n) for n in table] for limit, table in lengths.items()},
        )
        await serve(engine, host=args.host, port=args.port)

    asyncio.run(run())


if __name__ == "__main__":
    main()
