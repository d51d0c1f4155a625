"""Driving a benchmark stack: start one on free ports, and run closed-loop clients against its gateway."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from gkt_tools.bench.load import closed_loop, grpc_call
from gkt_tools.bench.stats import Sample, summarize
from gkt_tools.processes import free_port
from gkt_tools.stack import Stack

QUIET = {"GKT_GATEWAY_METRICS_PORT": "0", "GKT_TEACHER_METRICS_PORT": "0", "GKT_STUDENT_METRICS_PORT": "0"}
TIMEOUT_S = 600.0


def concurrency_levels(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c.strip()]


@contextlib.contextmanager
def running_stack(state: Path, env: dict[str, str], *, students: int) -> Iterator[Stack]:
    stack = Stack(
        state_dir=state, env={**QUIET, **env}, students=students, gateway_addr=f"127.0.0.1:{free_port()}"
    )
    print(f"starting a stack ({env.get('GKT_TEACHER_BACKEND', 'local')} teacher); logs in {state / 'logs'}")
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def run_on(
    stack: Stack, request: Any, *, concurrency: int, requests: int, warmup: int, label: str
) -> tuple[list[Sample], float]:
    """Unary requests against the stack's gateway from `concurrency` closed-loop clients."""
    from gkt.v1 import guidance_pb2_grpc

    async def go() -> tuple[list[Sample], float]:
        async with grpc.aio.insecure_channel(stack.gateway_addr or "") as channel:
            stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
            call = grpc_call(stub, request, stream=False, timeout_s=TIMEOUT_S)
            return await closed_loop(
                call, concurrency=concurrency, requests=requests, warmup=warmup, label=label
            )

    return asyncio.run(go())


def closed_loop_on(
    stack: Stack, request: Any, *, concurrency: int, requests: int, warmup: int, label: str
) -> dict[str, Any]:
    samples, wall = run_on(
        stack, request, concurrency=concurrency, requests=requests, warmup=warmup, label=label
    )
    return summarize(samples, wall_s=wall, concurrency=concurrency)
