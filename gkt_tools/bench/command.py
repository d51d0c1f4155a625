"""`gkt bench`: closed-loop load over the real gRPC API, side by side with the raw floors and offline runs.

Scenarios (`--scenarios`, all by default):
  overhead  the whole path on the zero-cost `echo-benchmark-only` backends, a concurrency sweep,
            next to a bare Redis-stream round trip and a bare Celery task round trip
  batching  teacher guidance throughput under load / an offline batched generate at the same batch size
  student   a student job's time / a bare `model.generate` of the same prompt and length
  student-capacity  the bundled student under load (GSM8K prompts, 40 guidance words from the echo
            teacher), at GKT_STUDENT_MAX_BATCH and at 1, same jobs, one stack after the other
  determinism  seeded student requests alone and in a changing batch: how many texts agree (offline)
  teacher-pipeline  Guide jobs through the pipelined teacher and through one batch at a time, at the
            same fake continuously batching server (fixed time per step, M rows a step)
  gkt       GKT vs teacher alone vs student alone, wall-clock, on the bundled models
Each starts its own stack (private Redis on a free port) unless `--addr` names a running gateway,
in which case only the sweep runs, against that gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gkt.jobs import Task
from gkt_tools.arguments import whole_number
from gkt_tools.bench import pipelining
from gkt_tools.bench.capacity import seeded_determinism, student_capacity
from gkt_tools.bench.models import real_scenarios
from gkt_tools.bench.overhead import overhead, sweep_only
from gkt_tools.bench.report import write_report
from gkt_tools.bench.runs import concurrency_levels
from gkt_tools.settings import ToolSettings

SCENARIOS = ("overhead", "batching", "student", "student-capacity", "determinism", "teacher-pipeline", "gkt")
_OWN_STACKS = ("overhead", "student-capacity", "determinism", "teacher-pipeline")
"""Scenarios that start their own stacks (or none); the others share one on the bundled models."""


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
        "--capacity-tokens",
        type=whole_number(1, 1024),
        default=128,
        help="student-capacity: each job's token limit (default: %(default)s)",
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
    pipelining.add_arguments(parser)
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
        results["overhead"] = asyncio.run(sweep_only(args))
    elif "overhead" in chosen:
        results["overhead"] = overhead(args, state / "echo")
    if "student-capacity" in chosen and not args.addr:
        results["student_capacity"] = student_capacity(args, state / "capacity")
    if "determinism" in chosen and not args.addr:
        results["determinism"] = seeded_determinism(args)
    if "teacher-pipeline" in chosen and not args.addr:
        results["teacher_pipeline"] = pipelining.run(args, state / "pipeline")
    real = [s for s in chosen if s not in _OWN_STACKS]
    if real and not args.addr:
        results.update(real_scenarios(args, real, state / "real"))
    results["meta"]["load_average_at_end"] = os.getloadavg()
    paths = write_report(results, args.out)
    print("\n".join(["wrote:", *(f"  {p}" for p in paths)]))
    return 0


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
