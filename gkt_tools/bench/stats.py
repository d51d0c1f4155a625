"""Summaries of a closed-loop run: throughput, latency percentiles, stage means, batch sizes."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

STAGES = ("queue_wait_ms", "teacher_ms", "student_wait_ms", "student_ms", "total_ms")
"""The per-stage timings every GKT reply carries (`StageTimings`)."""


@dataclass
class Sample:
    """One request as the client saw it, plus the stage timings its reply reported."""

    latency_s: float
    ok: bool = True
    ttft_s: float | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int = 0
    tokens: int = 0
    error: str = ""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) with linear interpolation between closest ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(samples: Sequence[Sample], *, wall_s: float, concurrency: int) -> dict[str, Any]:
    """Everything a report shows about one run; latencies in milliseconds."""
    ok = [s for s in samples if s.ok]
    latencies = [s.latency_s * 1000 for s in ok]
    ttfts = [s.ttft_s * 1000 for s in ok if s.ttft_s is not None]
    stages = {
        stage: _mean([s.stages_ms[stage] for s in ok if stage in s.stages_ms])
        for stage in STAGES
        if any(stage in s.stages_ms for s in ok)
    }
    batches = Counter(s.batch_size for s in ok if s.batch_size)
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "ok": len(ok),
        "errors": dict(Counter(s.error for s in samples if not s.ok)),
        "wall_s": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else math.nan,
        "latency_ms": _percentiles(latencies),
        "ttft_ms": _percentiles(ttfts) if ttfts else None,
        "stage_mean_ms": stages,
        "batch_sizes": {str(size): batches[size] for size in sorted(batches)},
        "mean_batch_size": _mean([float(s.batch_size) for s in ok if s.batch_size]),
        "tokens": sum(s.tokens for s in ok),
    }


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": _mean(values),
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
