"""`gkt bench --scenarios teacher-pipeline`: the pipelined teacher against one batch at a time, at the same
continuously batching server (`gkt_tools.bench.stepping_server`: fixed time per step, up to M rows a step,
guidance lengths from a spread), in the same run.

Two stacks (gateway + teacher, `openai` backend, no students: `Guide` jobs) share one server; each
round measures one then the other on the same requests, so a change in the machine's load touches both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2

from gkt import paper
from gkt.paper import Task
from gkt_tools.arguments import real_number, whole_number
from gkt_tools.bench import guidance_lengths
from gkt_tools.bench.runs import run_on, running_stack
from gkt_tools.bench.stats import Sample, summarize
from gkt_tools.processes import free_port


def _modes(rows: int) -> dict[str, dict[str, str]]:
    """Each teacher measured: one batch of M at a time, M in flight, and 2M in flight (the server then
    always has a request waiting for the next free row)."""
    return {
        "batched": {"GKT_TEACHER_PIPELINE": "false"},
        "pipelined": {"GKT_TEACHER_PIPELINE": "true"},
        "pipelined-2m": {
            "GKT_TEACHER_PIPELINE": "true",
            "GKT_TEACHER_MAX_IN_FLIGHT": str(2 * rows),
            "GKT_TEACHER_MAX_CONCURRENCY": str(2 * rows),
        },
    }


GUIDANCE_TOKENS = tuple(
    paper.TASK_DEFAULTS[task].max_guidance_tokens for task in (Task.AQUA, Task.CSQA, Task.GSM8K)
)
"""The paper's guidance lengths (AQuA, CSQA, GSM8K), one request in three each."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server-rows",
        type=whole_number(1, 4096),
        default=16,
        help="teacher-pipeline: rows per server step (M)",
    )
    parser.add_argument(
        "--server-step-ms", type=whole_number(1, 10_000), default=25, help="teacher-pipeline: time of a step"
    )
    parser.add_argument(
        "--pipeline-requests", type=whole_number(1), default=480, help="teacher-pipeline: Guide jobs per mode"
    )
    parser.add_argument(
        "--pipeline-rounds", type=whole_number(1, 100), default=2, help="teacher-pipeline: rounds"
    )
    parser.add_argument(
        "--guidance-median",
        type=whole_number(1, 10_000),
        default=20,
        help="teacher-pipeline: median tokens after which an answer ends on its own (log-normal); with the "
        "default σ, about half of the jobs end before their guidance limit",
    )
    parser.add_argument(
        "--guidance-sigma",
        type=real_number(0, 10, open_low=True),
        default=0.6,
        help="teacher-pipeline: log-normal shape of that length",
    )
    parser.add_argument(
        "--guidance-lengths",
        choices=("spread", "bundled"),
        default="spread",
        help="teacher-pipeline: where each answer's natural length comes from: the log-normal spread above, "
        "or the lengths the bundled teacher writes on the first --length-questions questions of each task "
        "(measured first, a few minutes)",
    )
    parser.add_argument(
        "--length-questions",
        type=whole_number(1, 10_000),
        default=48,
        help="teacher-pipeline with --guidance-lengths bundled: questions per task",
    )


def run(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    rows, step_ms = args.server_rows, args.server_step_ms
    concurrency = 3 * rows  # more clients than any teacher holds: each runs at its own pace
    modes = _modes(rows)
    per_round = max(1, args.pipeline_requests // args.pipeline_rounds)
    spread: dict[str, Any] = {"median_tokens": args.guidance_median, "sigma": args.guidance_sigma}
    measured = None
    if args.guidance_lengths == "bundled":
        if args.torch_threads:
            import torch

            torch.set_num_threads(args.torch_threads)
        measured = guidance_lengths.measure(data_dir=args.data_dir, questions=args.length_questions)
        table = state / "guidance-lengths.json"
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(json.dumps(guidance_lengths.by_limit(measured)))
        spread = {"lengths": f"the bundled teacher's ({measured['model']})", "lengths_file": str(table)}
    with _stepping_server(
        rows=rows, step_ms=step_ms, spread=spread, log=state / "stepping-server.log"
    ) as url:
        env = {
            "GKT_TEACHER_BACKEND": "openai",
            "GKT_TEACHER_URL": url,
            "GKT_TEACHER_MAX_CONCURRENCY": str(rows),
            "GKT_TEACHER_MAX_IN_FLIGHT": str(rows),
            "GKT_TEACHER_MAX_BATCH_SIZE": str(rows),
            "GKT_TEACHER_TEMPERATURE": "0",
            "GKT_LOG_LEVEL": "WARNING",
        }
        samples: dict[str, list[Sample]] = {mode: [] for mode in modes}
        walls = dict.fromkeys(modes, 0.0)
        busy = {mode: {"steps": 0, "row_steps": 0, "waiting_steps": 0} for mode in modes}
        with contextlib.ExitStack() as stacks:
            running = {
                mode: stacks.enter_context(running_stack(state / mode, env | overrides, students=0))
                for mode, overrides in modes.items()
            }
            for mode, stack in running.items():  # connections, the first batches
                run_on(stack, _request(0), concurrency=concurrency, requests=concurrency, warmup=0,
                       label=f"teacher-pipeline warm-up {mode}")  # fmt: skip
            for round_number in range(args.pipeline_rounds):
                offset = 1_000_000 * (round_number + 1)
                for mode, stack in running.items():
                    before = _stats(url)
                    got, wall = run_on(
                        stack, _request(offset), concurrency=concurrency, requests=per_round, warmup=0,
                        label=f"teacher-pipeline {mode} round {round_number + 1}",
                    )  # fmt: skip
                    after = _stats(url)
                    samples[mode] += got
                    walls[mode] += wall
                    for key in busy[mode]:
                        busy[mode][key] += after[key] - before[key]
    runs = {mode: summarize(samples[mode], wall_s=walls[mode], concurrency=concurrency) for mode in modes}
    for mode, run_summary in runs.items():
        steps = busy[mode]["steps"]
        run_summary["mean_rows_per_step"] = busy[mode]["row_steps"] / steps if steps else 0.0
        run_summary["mean_waiting_per_step"] = busy[mode]["waiting_steps"] / steps if steps else 0.0
        run_summary["server_row_utilization"] = (
            busy[mode]["row_steps"] * step_ms / 1000 / (walls[mode] * rows)
        )
    batched = runs["batched"]
    lengths: dict[str, Any] = {}
    if measured is not None:
        ceiling = guidance_lengths.batch_ceiling(measured, rows=rows, limits=GUIDANCE_TOKENS)
        lengths = {"measured_lengths": measured, "full_rows_vs_one_batch_ceiling": ceiling}
    return {
        "server": {
            "rows": rows,
            "step_ms": step_ms,
            **{k: v for k, v in spread.items() if k != "lengths_file"},
        },
        **lengths,
        "guidance_tokens": list(GUIDANCE_TOKENS),
        "concurrency": concurrency,
        "runs": runs,
        "vs_batched": {
            mode: {
                "throughput": run["throughput_rps"] / batched["throughput_rps"],
                "p50": run["latency_ms"]["p50"] / batched["latency_ms"]["p50"],
                "p99": run["latency_ms"]["p99"] / batched["latency_ms"]["p99"],
            }
            for mode, run in runs.items()
            if mode != "batched"
        },
    }


def _request(offset: int) -> Callable[[int], Any]:
    from gkt.v1 import guidance_pb2 as pb

    def request(index: int) -> Any:
        return pb.GuideRequest(
            query=f"How many boxes does shelf {offset + index} hold?",
            task=pb.TASK_FREEFORM,
            guidance=pb.GuidanceParams(
                mode=pb.GUIDANCE_MODE_CUTOFF,
                max_guidance_tokens=GUIDANCE_TOKENS[index % len(GUIDANCE_TOKENS)],
            ),
        )

    return request


@contextlib.contextmanager
def _stepping_server(*, rows: int, step_ms: int, spread: dict[str, Any], log: Path) -> Iterator[str]:
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "gkt_tools.bench.stepping_server", "--port", str(port), "--rows", str(rows),
               "--step-ms", str(step_ms)]  # fmt: skip
    if "lengths_file" in spread:
        command += ["--lengths", spread["lengths_file"]]
    else:
        command += ["--median-tokens", str(spread["median_tokens"]), "--sigma", str(spread["sigma"])]
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    _stats(url)
                    break
                except httpx2.HTTPError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError(f"the stepping server did not start; see {log}") from None
                    time.sleep(0.1)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)


def _stats(url: str) -> dict[str, int]:
    reply = httpx2.get(f"{url}/stats", timeout=5)
    reply.raise_for_status()
    return {key: int(value) for key, value in reply.json().items()}
