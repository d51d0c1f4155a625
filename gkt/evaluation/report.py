"""The report: the paper's Table 2 columns computed from the records, as JSON, Markdown and PNG plots.

Every row is computed over the same examples — those finished in every row — so ΔACC and Speed Up
compare like with like even when a run was interrupted part-way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gkt.evaluation.oracle import ORACLE
from gkt.evaluation.plan import Condition, EvalPlan
from gkt.evaluation.records import ExampleRecord
from gkt.jobs import GuidanceMode

SUMMARY_FILE, TABLE_FILE = "summary.json", "table.md"
ACCURACY_PLOT, TIME_PLOT = "accuracy.png", "time.png"
ORACLE_SOURCE = "oracle (reference solution)"


@dataclass(frozen=True)
class Row:
    """One line of Table 2. Accuracies are fractions; times are seconds."""

    name: str
    mode: str
    guidance_tokens: int
    """The row's N (its max_guidance_tokens; 0 for the baselines), under the report's own column name."""
    models: str
    examples: int
    mean_guidance_tokens: float
    mean_student_tokens: float
    acc_teacher: float | None
    acc: float
    delta_acc: float | None
    unparsed: int
    total_seconds: float
    teacher_seconds: float
    """The teacher's part of `total_seconds` (its batches); the rest is the students'."""
    speed_up: float | None


def summarize(
    *,
    plan: EvalPlan,
    records: Mapping[tuple[str, int], ExampleRecord],
    dataset: Mapping[str, Any],
    conditions: Sequence[Condition] | None = None,
) -> dict[str, Any]:
    """Table 2 over the examples every row has finished, with the settings that produced it.

    `conditions`: the rows to show (default: the plan's)."""
    conditions = list(plan.conditions() if conditions is None else conditions)
    indices = sorted(
        set.intersection(*({i for (name, i) in records if name == c.name} for c in conditions))
        if conditions
        else set()
    )
    by_row = {c.name: [records[(c.name, i)] for i in indices] for c in conditions}
    student = by_row.get("student")
    teacher = by_row.get("teacher")
    student_acc = _accuracy(student) if student else None
    teacher_time = sum(r.seconds for r in teacher) if teacher else None
    rows = [_row(plan, c, by_row[c.name], student_acc, teacher_time) for c in conditions] if indices else []
    return {
        "dataset": dict(dataset),
        "plan": {
            **plan.identity(),
            "modes": [m.value for m in plan.modes],
            "guidance_tokens": list(plan.max_guidance_tokens),
            "baselines": [m.value for m in plan.baselines],
            "oracle": plan.oracle,
            **plan.extra,
        },
        "examples": len(indices),
        "example_indices": _ranges(indices),
        "rows": [asdict(row) for row in rows],
    }


def write_report(summary: Mapping[str, Any], directory: Path) -> list[Path]:
    """summary.json, table.md and (when there are GKT rows) the two plots; returns the files written."""
    written = [directory / SUMMARY_FILE, directory / TABLE_FILE]
    written[0].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written[1].write_text(markdown_table(summary), encoding="utf-8")
    rows = [Row(**row) for row in summary["rows"]]
    if any(row.mode not in (GuidanceMode.NONE.value, GuidanceMode.FULL.value) for row in rows):
        written += _plots(rows, directory, title=_title(summary))
    return written


def markdown_table(summary: Mapping[str, Any]) -> str:
    """Table 2 as Markdown, headed by what was run."""
    lines = [
        f"### {_title(summary)}",
        "",
        "| Method | Teacher → Student | N | Guidance tokens | Student tokens | ACC_teacher | ACC | ΔACC "
        "| Unparsed | Time (s) | Speed Up |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in (Row(**r) for r in summary["rows"]):
        lines.append(
            f"| {_method(row)} | {row.models} | {row.guidance_tokens or '—'} | {row.mean_guidance_tokens:.1f} "
            f"| {row.mean_student_tokens:.1f} | {_percent(row.acc_teacher)} | {_percent(row.acc)} "
            f"| {_signed(row.delta_acc)} | {row.unparsed} | {row.total_seconds:.1f} "
            f"| {'—' if row.speed_up is None else f'{row.speed_up:.2f}×'} |"
        )
    return "\n".join(lines) + "\n"


def _row(
    plan: EvalPlan,
    condition: Condition,
    records: Sequence[ExampleRecord],
    student_acc: float | None,
    teacher_time: float | None,
) -> Row:
    n = len(records)
    acc = _accuracy(records)
    total = sum(r.seconds for r in records)
    teacher_side = ORACLE_SOURCE if condition.oracle else plan.teacher if condition.uses_teacher else "—"
    student_side = plan.student if condition.uses_student else "—"
    return Row(
        name=condition.name,
        mode=condition.kind,
        guidance_tokens=condition.max_guidance_tokens if condition.mode is not GuidanceMode.FULL else 0,
        models=f"{teacher_side} → {student_side}",
        examples=n,
        mean_guidance_tokens=sum(r.guidance_tokens for r in records) / n,
        mean_student_tokens=sum(r.student_tokens for r in records) / n,
        acc_teacher=sum(r.teacher_correct for r in records) / n if condition.guided else None,
        acc=acc,
        delta_acc=None if student_acc is None else acc - student_acc,
        unparsed=sum(r.answer is None for r in records),
        total_seconds=total,
        teacher_seconds=sum(r.teacher_seconds for r in records),
        speed_up=None if teacher_time is None or total <= 0 else teacher_time / total,
    )


def _accuracy(records: Sequence[ExampleRecord]) -> float:
    return sum(r.correct for r in records) / len(records)


def _plots(rows: Sequence[Row], directory: Path, *, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric, label, filename in (
        ("acc", "accuracy (%)", ACCURACY_PLOT),
        ("total_seconds", "total time (s)", TIME_PLOT),
    ):
        figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
        scale = 100.0 if metric == "acc" else 1.0
        for mode in sorted({r.mode for r in rows if r.guidance_tokens and r.mode != "full"}):
            points = sorted((r.guidance_tokens, getattr(r, metric) * scale) for r in rows if r.mode == mode)
            label = "oracle guidance" if mode == ORACLE else f"GKT {mode}"
            axes.plot(*zip(*points, strict=True), marker="o", label=label)
        for baseline, style, colour in (("student", ":", "tab:green"), ("teacher", "--", "tab:red")):
            for r in rows:
                if r.name == baseline:
                    axes.axhline(
                        getattr(r, metric) * scale, linestyle=style, color=colour, label=f"{baseline} alone"
                    )
        axes.set_xticks(sorted({r.guidance_tokens for r in rows if r.guidance_tokens}))
        if metric == "acc":
            axes.set_ylim(0, 100)
        else:
            axes.set_ylim(bottom=0)
        axes.set_xlabel("guidance length N (teacher tokens)")
        axes.set_ylabel(label)
        axes.set_title(title, fontsize=9)
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(directory / filename)
        plt.close(figure)
        paths.append(directory / filename)
    return paths


def _title(summary: Mapping[str, Any]) -> str:
    plan = summary["plan"]
    students = f", students at batch {plan['student_batch_size']}" if plan.get("student_batch_size") else ""
    return (
        f"{plan['task'].upper()} ({summary['examples']} examples: {summary['example_indices']}), "
        f"{plan['runner']} run, seed {plan['seed']}, {plan['exemplar_set']} exemplars{students}"
    )


def _method(row: Row) -> str:
    if row.mode == GuidanceMode.NONE.value:
        return "Student alone"
    if row.mode == GuidanceMode.FULL.value:
        return "Teacher alone"
    if row.mode == ORACLE:
        return "Oracle guidance (evaluation only)"
    return f"GKT {row.mode}"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.1f}"


def _ranges(indices: Sequence[int]) -> str:
    """`0-49, 60` for the dataset positions covered, so a reader knows exactly which subset ran."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans) or "none"
