"""The closed-loop load generator: `concurrency` clients, each sending its next request when the last returns.

Any call works (a gRPC request, a bare Redis round trip, a bare Celery task), so the floors and the
full system are measured by the same loop.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from tqdm import tqdm

from gkt_tools.bench.stats import STAGES, Sample

Call = Callable[[int], Awaitable[Sample]]
"""Sends request number `i` and returns what the client saw."""


async def closed_loop(
    call: Call, *, concurrency: int, requests: int, warmup: int = 0, label: str = ""
) -> tuple[list[Sample], float]:
    """Run `requests` calls from `concurrency` clients; returns the samples and the wall time.

    The first `warmup` calls (connections, caches) are made first and not counted.
    """
    counter = itertools.count()
    samples: list[Sample] = []
    if warmup:
        await asyncio.gather(*(call(-1 - i) for i in range(warmup)))
    with tqdm(total=requests, desc=label, unit="req", leave=False, dynamic_ncols=True) as progress:

        async def client() -> None:
            while (index := next(counter)) < requests:
                samples.append(await call(index))
                progress.update(1)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
    return samples, wall_s


def grpc_call(stub: Any, make_request: Callable[[int], Any], *, stream: bool, timeout_s: float) -> Call:
    """A GKT request over gRPC (`Generate`, `GenerateStream` or `Guide`, by the request's type)."""

    async def call(index: int) -> Sample:
        request = make_request(index)
        started = time.perf_counter()
        try:
            if type(request).__name__ == "GuideRequest":
                reply = await stub.Guide(request, timeout=timeout_s)
                return _sample(reply, time.perf_counter() - started, None, reply.guidance_tokens)
            if not stream:
                reply = await stub.Generate(request, timeout=timeout_s)
                return _sample(reply, time.perf_counter() - started, None, reply.usage.completion_tokens)
            ttft: float | None = None
            final = None
            async for event in stub.GenerateStream(request, timeout=timeout_s):
                kind = event.WhichOneof("event")
                if ttft is None and (
                    (kind == "guidance" and event.guidance.guidance) or (kind == "delta" and event.delta.text)
                ):
                    ttft = time.perf_counter() - started
                if kind == "final":
                    final = event.final
            if final is None:
                return Sample(latency_s=time.perf_counter() - started, ok=False, error="no final event")
            return _sample(final, time.perf_counter() - started, ttft, final.usage.completion_tokens)
        except grpc.aio.AioRpcError as exc:
            return Sample(latency_s=time.perf_counter() - started, ok=False, error=exc.code().name)

    return call


def _sample(reply: Any, latency_s: float, ttft_s: float | None, tokens: int) -> Sample:
    timings = reply.timings
    return Sample(
        latency_s=latency_s,
        ttft_s=ttft_s,
        stages_ms={stage: float(getattr(timings, stage)) for stage in STAGES},
        batch_size=int(timings.teacher_batch_size),
        tokens=int(tokens),
    )
