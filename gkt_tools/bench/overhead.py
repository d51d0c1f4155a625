"""The `overhead` scenario: the whole path on the zero-cost echo backends, swept over concurrency, beside a
bare Redis-stream round trip and a bare Celery task round trip (`floors`)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import grpc
from redis.asyncio import Redis as AsyncRedis

from gkt_tools.bench import floors
from gkt_tools.bench.load import closed_loop, grpc_call
from gkt_tools.bench.runs import TIMEOUT_S, concurrency_levels, running_stack
from gkt_tools.bench.stats import summarize
from gkt_tools.stack import Stack


def overhead(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    env = {
        "GKT_TEACHER_BACKEND": "echo-benchmark-only",
        "GKT_STUDENT_MODEL": "echo-benchmark-only",
        "GKT_TEACHER_MAX_BATCH_SIZE": "32",
        "GKT_TEACHER_MAX_WAIT_MS": str(args.echo_max_wait_ms),
        "GKT_STUDENT_STREAM_INTERVAL_MS": str(args.stream_interval_ms),
        "GKT_STUDENT_WARMUP": "false",
        "GKT_LOG_LEVEL": "WARNING",
    }
    with running_stack(state, env, students=args.echo_students) as stack:
        return asyncio.run(_overhead_runs(args, stack))


async def _overhead_runs(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    levels = concurrency_levels(args.concurrency)
    redis = AsyncRedis.from_url(stack.redis_url or "")
    client = floors.floor_client(stack.redis_url or "")
    sweep: dict[str, list[dict[str, Any]]] = {"gkt": [], "redis_floor": [], "celery_floor": []}
    stream = "gkt-bench-floor:requests"
    with floors.floor_processes(
        redis_url=stack.redis_url or "", stream=stream, log_dir=stack.state_dir / "logs"
    ):
        calls = {
            "redis_floor": floors.redis_call(redis, stream=stream),
            "celery_floor": floors.celery_call(redis, client),
        }
        async with grpc.aio.insecure_channel(stack.gateway_addr or "") as channel:
            calls["gkt"] = _echo_call(channel)
            for level in levels:
                for system, call in calls.items():
                    samples, wall = await closed_loop(
                        call, concurrency=level, requests=args.requests, warmup=min(level, 8),
                        label=f"overhead {system} x{level}",
                    )  # fmt: skip
                    sweep[system].append(summarize(samples, wall_s=wall, concurrency=level))
    await redis.aclose()
    return _overhead_summary(sweep)


async def sweep_only(args: argparse.Namespace) -> dict[str, Any]:
    sweep: dict[str, list[dict[str, Any]]] = {"gkt": []}
    async with grpc.aio.insecure_channel(args.addr) as channel:
        for level in concurrency_levels(args.concurrency):
            samples, wall = await closed_loop(
                _echo_call(channel), concurrency=level, requests=args.requests, warmup=min(level, 8),
                label=f"{args.addr} x{level}",
            )  # fmt: skip
            sweep["gkt"].append(summarize(samples, wall_s=wall, concurrency=level))
    return {"sweep": sweep, "saturation_rps": {"gkt": max(r["throughput_rps"] for r in sweep["gkt"])}}


def _echo_call(channel: grpc.aio.Channel) -> Any:
    from gkt.v1 import guidance_pb2 as pb
    from gkt.v1 import guidance_pb2_grpc

    def request(index: int) -> Any:
        return pb.GenerateRequest(
            query=f"How many benchmark requests are there after request {index}?",
            task=pb.TASK_FREEFORM,
            guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=4),
            sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=16, seed=1),
        )

    return grpc_call(
        guidance_pb2_grpc.GuidanceServiceStub(channel), request, stream=True, timeout_s=TIMEOUT_S
    )


def _overhead_summary(sweep: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The headline numbers: p50 at the lowest concurrency, and the best throughput of the sweep."""
    first = {system: runs[0] for system, runs in sweep.items()}
    return {
        "sweep": sweep,
        "unloaded": {f"{system}_p50_ms": run["latency_ms"]["p50"] for system, run in first.items()}
        | {"concurrency": first["gkt"]["concurrency"]},
        "saturation_rps": {system: max(r["throughput_rps"] for r in runs) for system, runs in sweep.items()},
    }
