"""The guidance lengths a real teacher writes, for the teacher-pipeline scenario to replay.

How much a pipelined teacher gains over one batch at a time depends on how much the lengths of a batch's
guidance differ: a batch lasts as long as its longest row. `gkt bench --scenarios teacher-pipeline
--guidance-lengths bundled` first has the bundled teacher write the guidance of the first questions of
each task (cutoff mode, the paper's N, greedy, through the teacher's own local backend), then the stepping
server ends each request after a length drawn from those of its N.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from gkt import paper
from gkt.paper import Task

TASKS = (Task.AQUA, Task.CSQA, Task.GSM8K)


def measure(*, data_dir: Path, questions: int) -> dict[str, Any]:
    """Per task: N, the token count of each question's guidance, and how many reached N."""
    from gkt.evaluation.datasets import load_dataset
    from gkt.jobs import GuidanceMode
    from gkt.models import load_model
    from gkt.prompts import STOP_SEQUENCE, teacher_prompt
    from services.teacher.backends.base import GenerationRequest
    from services.teacher.backends.local import LocalBackend
    from services.teacher.settings import TeacherSettings

    settings = TeacherSettings()
    lm = load_model(name=settings.local_model, cache_dir=settings.model_cache_dir)
    backend = LocalBackend.from_loaded(lm)
    measured: dict[str, Any] = {"model": settings.local_model, "questions": questions, "tasks": {}}
    for task in TASKS:
        n = paper.TASK_DEFAULTS[task].max_guidance_tokens
        examples = load_dataset(task=task, data_dir=data_dir, limit=questions).examples
        print(f"guidance lengths: the bundled teacher on {len(examples)} {task.value} questions (N = {n})…")
        started = time.perf_counter()
        results = backend.generate_sync(
            [
                GenerationRequest(
                    prompt=teacher_prompt(task=task, mode=GuidanceMode.CUTOFF, query=example.query),
                    max_guidance_tokens=n,
                    stop=(STOP_SEQUENCE,),
                )
                for example in examples
            ]
        )
        lengths = [max(1, result.token_count) for result in results]
        measured["tasks"][task.value] = {
            "max_guidance_tokens": n,
            "lengths": lengths,
            "mean": statistics.mean(lengths),
            "at_limit": sum(length >= n for length in lengths) / len(lengths),
            "seconds": time.perf_counter() - started,
        }
    return measured


def by_limit(measured: dict[str, Any]) -> dict[str, list[int]]:
    """The stepping server's table: a request's `max_tokens` (N) → the lengths to draw from."""
    return {str(task["max_guidance_tokens"]): task["lengths"] for task in measured["tasks"].values()}


def batch_ceiling(measured: dict[str, Any], *, rows: int, limits: tuple[int, ...]) -> float:
    """The most a teacher that keeps every row busy can gain over one batch of `rows` at a time, at these
    lengths (requests asking for `limits` in turn, as the scenario sends them): the mean length over the
    mean longest of a batch. Exact expectation over every batch is costly; batches are drawn instead
    (seeded, so the figure is the same for the same lengths)."""
    import random

    table = by_limit(measured)
    draw = random.Random(0)
    total = longest = 0
    for _ in range(4000):
        batch = [draw.choice(table[str(limits[i % len(limits)])]) for i in range(rows)]
        total += sum(batch)
        longest += max(batch) * rows
    return longest / total
