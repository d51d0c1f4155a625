"""The `student-capacity` and `determinism` scenarios: the bundled student under load at two batch sizes,
and seeded requests alone and batched (offline)."""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gkt import paper
from gkt.jobs import Task
from gkt_tools.bench.runs import concurrency_levels, run_on, running_stack
from gkt_tools.bench.stats import Sample, summarize


def student_capacity(args: argparse.Namespace, state: Path) -> dict[str, Any]:
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
            # Each level's jobs go in two halves, A B A B, so drift in the machine's load falls on both;
            # each half holds twice as many jobs as clients, so the batch runs full, not only its tail.
            half = max(4, 2 * level)
            measured: dict[str, tuple[list[Sample], float]] = {label: ([], 0.0) for label in sizes}
            for offset in (0, half):
                for label, stack in running.items():
                    samples, wall = run_on(
                        stack, functools.partial(_shifted, request, offset), concurrency=level,
                        requests=half, warmup=0, label=f"student-capacity max batch {sizes[label]} x{level}",
                    )  # fmt: skip
                    done, spent = measured[label]
                    measured[label] = (done + samples, spent + wall)
            for label, (samples, wall) in measured.items():
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


def _shifted(request: Callable[[int], Any], offset: int, index: int) -> Any:
    return request(offset + index)


def seeded_determinism(args: argparse.Namespace) -> dict[str, Any]:
    from gkt.evaluation.datasets import load_dataset
    from gkt.models import load_model
    from gkt_tools.bench import determinism
    from services.student.settings import StudentSettings

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    settings = StudentSettings()
    lm = load_model(name=settings.local_model, cache_dir=settings.model_cache_dir)
    gsm8k = load_dataset(task=Task.GSM8K, data_dir=args.data_dir, limit=None)
    batch = determinism.requests(
        lm, [e.query for e in gsm8k.examples], count=args.determinism_requests, max_new_tokens=16
    )
    print(f"determinism: {len(batch)} requests alone, then in a batch of up to {args.capacity_max_batch}…")
    return determinism.measure(lm, batch, max_batch=args.capacity_max_batch)


def _at(levels: list[int], level: int, values: list[float]) -> float | None:
    return values[levels.index(level)] if level in levels else None
