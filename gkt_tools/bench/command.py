"""`gkt bench`: closed-loop load over the real gRPC API, side by side with the raw floors and offline runs.

Scenarios (`--scenarios`, all by default):
  overhead  the whole path on the zero-cost `echo-benchmark-only` backends, a concurrency sweep,
            next to a bare Redis-stream round trip and a bare Celery task round trip
  batching  teacher guidance throughput under load / an offline batched generate at the same batch size
  student   a student job's time / a bare `model.generate` of the same prompt and length
  student-capacity  the bundled student under load (GSM8K prompts, 40 guidance words from the echo
            teacher), at GKT_STUDENT_MAX_BATCH and at 1, same jobs, one stack after the other
  determinism  seeded student requests alone and in a changing batch: how many texts agree (offline)
  gkt       GKT vs teacher alone vs student alone, wall-clock, on the bundled models
Each starts its own stack (private Redis on a free port) unless `--addr` names a running gateway,
in which case only the sweep runs, against that gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from redis.asyncio import Redis as AsyncRedis

from gkt import paper
from gkt.jobs import Task
from gkt_tools.arguments import whole_number
from gkt_tools.bench import floors
from gkt_tools.bench.load import closed_loop, grpc_call
from gkt_tools.bench.report import write_report
from gkt_tools.bench.stats import Sample, summarize
from gkt_tools.processes import free_port
from gkt_tools.settings import ToolSettings
from gkt_tools.stack import Stack

SCENARIOS = ("overhead", "batching", "student", "student-capacity", "determinism", "gkt")
_QUIET = {"GKT_GATEWAY_METRICS_PORT": "0", "GKT_TEACHER_METRICS_PORT": "0", "GKT_STUDENT_METRICS_PORT": "0"}
_TIMEOUT_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--addr", help="benchmark this running gateway (sweep only) instead of starting stacks"
    )
    parser.add_argument("--concurrency", default="1,4,16,64", help="overhead sweep: clients per level")
    parser.add_argument(
        "--requests", type=whole_number(1), default=400, help="overhead sweep: requests per level"
    )
    parser.add_argument(
        "--echo-students", type=whole_number(1, 64), default=2, help="overhead: Celery worker processes"
    )
    parser.add_argument(
        "--echo-max-wait-ms",
        type=whole_number(0, 10_000),
        default=0,
        help="overhead: GKT_TEACHER_MAX_WAIT_MS",
    )
    parser.add_argument(
        "--stream-interval-ms",
        type=whole_number(0, 10_000),
        default=20,
        help="GKT_STUDENT_STREAM_INTERVAL_MS",
    )
    parser.add_argument(
        "--batch-size", type=whole_number(1, 512), default=8, help="teacher batch size (real models)"
    )
    parser.add_argument(
        "--batches", type=whole_number(1), default=6, help="batching: batches measured online and offline"
    )
    parser.add_argument("--student-jobs", type=whole_number(1), default=8, help="student: jobs measured")
    parser.add_argument("--questions", type=whole_number(1), default=24, help="gkt: CSQA questions per run")
    parser.add_argument(
        "--guidance-tokens",
        dest="max_guidance_tokens",
        type=whole_number(1, 512),
        default=10,
        help="gkt and batching: guidance tokens",
    )
    parser.add_argument(
        "--capacity-concurrency", default="1,4,8,16", help="student-capacity: clients per level"
    )
    parser.add_argument(
        "--capacity-max-batch",
        type=whole_number(1, 256),
        default=16,
        help="student-capacity: GKT_STUDENT_MAX_BATCH measured",
    )
    parser.add_argument(
        "--determinism-requests", type=whole_number(2, 10_000), default=200, help="determinism: requests"
    )
    parser.add_argument(
        "--capacity-tokens", type=whole_number(1, 1024), default=32, help="student-capacity: tokens per job"
    )
    parser.add_argument(
        "--no-prefix-cache", action="store_true", help="real stacks: turn prefix KV reuse off"
    )
    parser.add_argument(
        "--torch-threads",
        type=whole_number(0, 1024),
        default=1,
        help="GKT_TORCH_THREADS of every model process, and of the offline runs (0 = torch's default)",
    )
    parser.add_argument(
        "--data-dir", type=Path, help="where the datasets live (default: $GKT_DATA_DIR, else ../shared/data)"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="report directory")


def run(args: argparse.Namespace, *, settings: ToolSettings) -> int:
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        print(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}", file=sys.stderr
        )
        return 2
    try:
        levels = concurrency_levels(args.concurrency)
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        print(
            f"--concurrency takes whole numbers of at least 1, e.g. 1,4,16; got {args.concurrency!r}",
            file=sys.stderr,
        )
        return 2
    args.data_dir = settings.data_dir_for(args.data_dir)
    # A plain SIGTERM would skip the `finally` that stops the stacks: exit through it instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, Any] = {"meta": _meta(args)}
    state = Path(tempfile.mkdtemp(prefix="gkt-bench-"))
    if args.addr:
        results["overhead"] = asyncio.run(_sweep_only(args))
    elif "overhead" in chosen:
        results["overhead"] = _overhead(args, state / "echo")
    if "student-capacity" in chosen and not args.addr:
        results["student_capacity"] = _student_capacity(args, state / "capacity")
    if "determinism" in chosen and not args.addr:
        results["determinism"] = _determinism(args)
    real = [s for s in chosen if s not in ("overhead", "student-capacity", "determinism")]
    if real and not args.addr:
        results.update(_real_scenarios(args, real, state / "real"))
    results["meta"]["load_average_at_end"] = os.getloadavg()
    paths = write_report(results, args.out)
    print("\n".join(["wrote:", *(f"  {p}" for p in paths)]))
    return 0


def concurrency_levels(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c.strip()]


@contextlib.contextmanager
def running_stack(state: Path, env: dict[str, str], *, students: int) -> Iterator[Stack]:
    stack = Stack(
        state_dir=state, env={**_QUIET, **env}, students=students, gateway_addr=f"127.0.0.1:{free_port()}"
    )
    print(f"starting a stack ({env.get('GKT_TEACHER_BACKEND', 'local')} teacher); logs in {state / 'logs'}")
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def _overhead(args: argparse.Namespace, state: Path) -> dict[str, Any]:
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


async def _sweep_only(args: argparse.Namespace) -> dict[str, Any]:
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
        guidance_pb2_grpc.GuidanceServiceStub(channel), request, stream=True, timeout_s=_TIMEOUT_S
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


def _student_capacity(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    """The same jobs at each concurrency, on a student decoding up to `--capacity-max-batch` jobs
    together, then on one decoding one at a time; the teacher is the echo backend, so the student is
    what is measured."""
    from gkt.evaluation.datasets import load_dataset
    from gkt.v1 import guidance_pb2 as pb

    gsm8k = load_dataset(task=Task.GSM8K, data_dir=args.data_dir, limit=None)
    queries = [example.query for example in gsm8k.examples]
    gsm8k_defaults = paper.TASK_DEFAULTS[Task.GSM8K]
    levels = concurrency_levels(args.capacity_concurrency)

    def request(index: int) -> Any:
        return pb.GenerateRequest(
            query=queries[index % len(queries)],
            task=pb.TASK_GSM8K,
            guidance=pb.GuidanceParams(
                mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=gsm8k_defaults.max_guidance_tokens
            ),
            sampling=pb.SamplingParams(
                temperature=paper.STUDENT_TEMPERATURE,
                top_p=paper.STUDENT_TOP_P,
                max_new_tokens=args.capacity_tokens,
                seed=index + 1,
            ),
        )

    sizes = {"batched": args.capacity_max_batch, "batch_1": 1}
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in sizes}
    with contextlib.ExitStack() as stacks:
        # Both stacks run at once and each level is measured on one right after the other, so a change
        # in the machine's load touches both sides of every ratio alike.
        running = {
            label: stacks.enter_context(
                running_stack(
                    state / label,
                    {
                        "GKT_TEACHER_BACKEND": "echo-benchmark-only",
                        "GKT_TEACHER_MAX_WAIT_MS": "0",
                        "GKT_STUDENT_MAX_BATCH": str(size),
                        "GKT_STUDENT_STREAM_INTERVAL_MS": str(args.stream_interval_ms),
                        "GKT_TORCH_THREADS": str(args.torch_threads),
                        "GKT_LOG_LEVEL": "WARNING",
                    },
                    students=1,
                )
            )
            for label, size in sizes.items()
        }
        for level in levels:
            for label, stack in running.items():
                samples, wall = _run_on(
                    stack, request, concurrency=level, requests=max(4, 2 * level), warmup=0,
                    label=f"student-capacity max batch {sizes[label]} x{level}",
                )  # fmt: skip
                summary = summarize(samples, wall_s=wall, concurrency=level)
                summary["tokens_per_s"] = sum(s.tokens for s in samples if s.ok) / wall
                runs[label].append(summary)
    batched, alone = runs["batched"], runs["batch_1"]
    return {
        "max_batch": args.capacity_max_batch,
        "tokens_per_job": args.capacity_tokens,
        "runs": runs,
        "tokens_per_s_ratio": {
            str(b["concurrency"]): b["tokens_per_s"] / a["tokens_per_s"]
            for b, a in zip(batched, alone, strict=True)
        },
        "tokens_per_s_ratio_at_16": _at(
            levels, 16, [b["tokens_per_s"] / a["tokens_per_s"] for b, a in zip(batched, alone, strict=True)]
        ),
        "p50_ratio_at_1": _at(
            levels,
            1,
            [b["latency_ms"]["p50"] / a["latency_ms"]["p50"] for b, a in zip(batched, alone, strict=True)],
        ),
    }


def _determinism(args: argparse.Namespace) -> dict[str, Any]:
    from gkt.evaluation.datasets import load_dataset
    from gkt.models import load_model
    from gkt_tools.bench import determinism
    from services.student.settings import StudentSettings

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    settings = StudentSettings()
    lm = load_model(name=settings.student_model, cache_dir=settings.model_cache_dir)
    gsm8k = load_dataset(task=Task.GSM8K, data_dir=args.data_dir, limit=None)
    batch = determinism.requests(
        lm, [e.query for e in gsm8k.examples], count=args.determinism_requests, max_new_tokens=16
    )
    print(f"determinism: {len(batch)} requests alone, then in a batch of up to {args.capacity_max_batch}…")
    return determinism.measure(lm, batch, max_batch=args.capacity_max_batch)


def _at(levels: list[int], level: int, values: list[float]) -> float | None:
    return values[levels.index(level)] if level in levels else None


def _real_scenarios(args: argparse.Namespace, chosen: list[str], state: Path) -> dict[str, Any]:
    """The scenarios on the bundled models, sharing one stack; offline runs happen while it idles."""
    from gkt.evaluation.datasets import load_dataset

    dataset = load_dataset(task=Task.CSQA, data_dir=args.data_dir, limit=None)
    queries = [example.query for example in dataset.examples]
    env = {
        "GKT_TEACHER_TEMPERATURE": "0",
        "GKT_TEACHER_MAX_BATCH_SIZE": str(args.batch_size),
        "GKT_STUDENT_STREAM_INTERVAL_MS": str(args.stream_interval_ms),
        "GKT_LOG_LEVEL": "WARNING",
        "GKT_TORCH_THREADS": str(args.torch_threads),
    }
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.no_prefix_cache:
        env |= {"GKT_TEACHER_PREFIX_CACHE": "false", "GKT_STUDENT_PREFIX_CACHE": "false"}
    results: dict[str, Any] = {}
    with running_stack(state, env, students=1) as stack:
        for scenario in chosen:
            results[scenario] = _REAL[scenario](args, stack, queries)
    return results


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    return {
        "command": shlex.join(["gkt", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, {platform.system()}, torch {torch.__version__}",
        "date": datetime.date.today().isoformat(),
        "started_at": time.time(),
        "load_average_at_start": os.getloadavg(),
        "scenarios": args.scenarios,
        "torch_threads": args.torch_threads,
        "task": Task.CSQA.value,
    }


def _batching(args: argparse.Namespace, stack: Stack, queries: list[str]) -> dict[str, Any]:
    """Guide jobs from twice as many clients as a batch holds, then the same batches offline."""
    from gkt.jobs import GuidanceMode
    from gkt.models import load_model
    from gkt.prompts import STOP_SEQUENCE, teacher_prompt
    from gkt.v1 import guidance_pb2 as pb
    from services.teacher.backends.base import GenerationRequest
    from services.teacher.backends.local import LocalBackend
    from services.teacher.settings import TeacherSettings

    size = args.batch_size
    chosen = queries[: size * args.batches]

    def request(index: int) -> Any:
        return pb.GuideRequest(
            query=chosen[index % len(chosen)],
            task=pb.TASK_CSQA,
            guidance=pb.GuidanceParams(
                mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=args.max_guidance_tokens
            ),
        )

    online = _closed_loop_on(
        stack, request, concurrency=2 * size, requests=len(chosen), warmup=size, label="batching online"
    )
    settings = TeacherSettings()
    lm = load_model(name=settings.teacher_model, cache_dir=settings.model_cache_dir)
    requests = [
        GenerationRequest(
            prompt=teacher_prompt(task=Task.CSQA, mode=GuidanceMode.CUTOFF, query=query),
            max_guidance_tokens=args.max_guidance_tokens,
            stop=(STOP_SEQUENCE,),
        )
        for query in chosen
    ]
    batches = [requests[i : i + size] for i in range(0, len(requests), size)]

    def offline_rps(backend: LocalBackend, count: int, *, warm: bool) -> float:
        if warm:  # the prefix cache, the allocator
            backend.generate_sync(batches[0])
        started = time.perf_counter()
        for batch in batches[:count]:
            backend.generate_sync(batch)
        return sum(len(b) for b in batches[:count]) / (time.perf_counter() - started)

    print("batching: offline batched generate…")
    reuse = not args.no_prefix_cache
    offline = offline_rps(LocalBackend.from_loaded(lm, prefix_cache=reuse), len(batches), warm=True)
    without = offline_rps(LocalBackend.from_loaded(lm, prefix_cache=False), 2, warm=False) if reuse else None
    return {
        "batch_size": size,
        "online": online,
        "offline_rps": offline,
        "offline_no_prefix_rps": without,
        "prefix_speedup_offline": offline / without if without else None,
        "efficiency": online["throughput_rps"] / offline,
    }


def _student(args: argparse.Namespace, stack: Stack, queries: list[str]) -> dict[str, Any]:
    """Student-alone jobs one at a time, then `model.generate` of the same prompts and token counts."""
    from gkt.models import load_model
    from gkt.prompts import student_prompt
    from gkt.v1 import guidance_pb2 as pb
    from services.student.settings import StudentSettings

    chosen = queries[: args.student_jobs]

    def request(index: int) -> Any:
        return pb.GenerateRequest(
            query=chosen[index % len(chosen)],
            task=pb.TASK_CSQA,
            guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_NONE),
            sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=100, seed=0),
        )

    samples, _wall = _run_on(
        stack, request, concurrency=1, requests=len(chosen), warmup=1, label="student jobs"
    )
    settings = StudentSettings()
    lm = load_model(name=settings.student_model, cache_dir=settings.model_cache_dir)
    model: Any = lm.model
    print("student: bare model.generate…")
    job_s = generate_s = 0.0
    tokens = 0
    for index, (query, sample) in enumerate(zip(chosen, samples, strict=True)):
        if not sample.ok or sample.tokens == 0:
            continue
        inputs = lm.tokenizer(student_prompt(task=Task.CSQA, query=query, guidance=""), return_tensors="pt")
        n = sample.tokens
        if index == 0:  # warm, uncounted
            model.generate(
                **inputs, max_new_tokens=2, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id
            )
        started = time.perf_counter()
        model.generate(
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
        generate_s += time.perf_counter() - started
        job_s += sample.stages_ms["student_ms"] / 1000
        tokens += n
    return {
        "jobs": len(chosen),
        "tokens": tokens,
        "student_s": job_s,
        "generate_s": generate_s,
        "ratio": job_s / generate_s if generate_s else float("nan"),
    }


def _gkt(args: argparse.Namespace, stack: Stack, queries: list[str]) -> dict[str, Any]:
    """The same questions three times through the gateway: student alone, teacher alone, GKT."""
    from gkt.v1 import guidance_pb2 as pb

    chosen = queries[: args.questions]
    runs = {
        "student_alone": pb.GuidanceParams(mode=pb.GUIDANCE_MODE_NONE),
        "teacher_alone": pb.GuidanceParams(mode=pb.GUIDANCE_MODE_FULL),
        "gkt": pb.GuidanceParams(mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=args.max_guidance_tokens),
    }
    results: dict[str, Any] = {
        "questions": len(chosen),
        "task": Task.CSQA.value,
        "concurrency": args.batch_size,
    }
    for name, guidance in runs.items():

        def request(index: int, guidance: Any = guidance) -> Any:
            return pb.GenerateRequest(
                query=chosen[index % len(chosen)],
                task=pb.TASK_CSQA,
                guidance=guidance,
                sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=100, seed=0),
            )

        results[name] = _closed_loop_on(
            stack, request, concurrency=args.batch_size, requests=len(chosen), warmup=0, label=f"gkt: {name}"
        )
    alone = results["student_alone"]["wall_s"]
    results["ratios"] = {name: results[name]["wall_s"] / alone for name in runs} | {
        "gkt_vs_teacher": results["gkt"]["wall_s"] / results["teacher_alone"]["wall_s"]
    }
    results["speed_up_vs_teacher"] = results["teacher_alone"]["wall_s"] / results["gkt"]["wall_s"]
    return results


_REAL = {"batching": _batching, "student": _student, "gkt": _gkt}


def _run_on(
    stack: Stack, request: Any, *, concurrency: int, requests: int, warmup: int, label: str
) -> tuple[list[Sample], float]:
    """Unary requests against the stack's gateway from `concurrency` closed-loop clients."""
    from gkt.v1 import guidance_pb2_grpc

    async def go() -> tuple[list[Sample], float]:
        async with grpc.aio.insecure_channel(stack.gateway_addr or "") as channel:
            stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
            call = grpc_call(stub, request, stream=False, timeout_s=_TIMEOUT_S)
            return await closed_loop(
                call, concurrency=concurrency, requests=requests, warmup=warmup, label=label
            )

    return asyncio.run(go())


def _closed_loop_on(
    stack: Stack, request: Any, *, concurrency: int, requests: int, warmup: int, label: str
) -> dict[str, Any]:
    samples, wall = _run_on(
        stack, request, concurrency=concurrency, requests=requests, warmup=warmup, label=label
    )
    return summarize(samples, wall_s=wall, concurrency=concurrency)
