"""The kept evaluation records (`docs/results/records/`) and every table and statistic recomputed from them.

Each run directory holds the `plan.json` and `records.jsonl.gz` of one `gkt eval` output directory. The
tables follow from the records alone: rows that finished the same questions share a table, and a row that
finished more questions joins each smaller table over that table's questions, so a sweep on a subset or a
row stopped early gets a table of its own and nothing is compared over different questions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gkt.evaluation.datasets import DATASETS
from gkt.evaluation.oracle import ORACLE
from gkt.evaluation.plan import Condition, EvalPlan
from gkt.evaluation.records import PLAN_FILE, ExampleRecord, read_records
from gkt.evaluation.report import markdown_table, summarize
from gkt.evaluation.statistics import UNPARSED, answer_counts, mcnemar_exact, paired_counts, wilson_interval
from gkt.jobs import Task
from gkt.prompts import ExemplarSet

RECORDS_ROOT = Path(__file__).resolve().parents[2] / "docs" / "results" / "records"
_LETTERS = ("A", "B", "C", "D", "E")
_KIND_ORDER = ("student", "teacher", "cutoff", "concise", "hint", ORACLE)


@dataclass(frozen=True)
class KeptRun:
    """One kept output directory: its plan and its records."""

    name: str
    plan: EvalPlan
    records: dict[tuple[str, int], ExampleRecord]


def read_runs(root: Path) -> list[KeptRun]:
    """Every run directory under `root` (one holding a plan.json), by name."""
    directories = sorted(p.parent for p in root.glob(f"*/{PLAN_FILE}"))
    if not directories:
        raise FileNotFoundError(f"no kept runs under {root}: each needs a {PLAN_FILE} and its records")
    return [read_run(d) for d in directories]


def read_run(directory: Path) -> KeptRun:
    identity = json.loads((directory / PLAN_FILE).read_text(encoding="utf-8"))
    records = read_records(directory)
    plan = EvalPlan(
        **{
            **identity,
            "task": Task(identity["task"]),
            "exemplar_set": ExemplarSet(identity["exemplar_set"]),
        },
        modes=(),
        max_guidance_tokens=(),
        extra=_batched_students(records),
    )
    return KeptRun(name=directory.name, plan=plan, records=records)


def _batched_students(records: Mapping[tuple[str, int], ExampleRecord]) -> dict[str, int]:
    """The run's student batch size, for the table's heading, where its students were decoded together."""
    sizes = {record.student_batch_size for record in records.values() if record.student_batch_size > 1}
    return {"student_batch_size": max(sizes)} if sizes else {}


def table_groups(run: KeptRun) -> list[tuple[list[Condition], list[int]]]:
    """(rows, questions) of each table: one per distinct set of finished questions, the largest first."""
    covered: dict[str, set[int]] = {}
    for name, index in run.records:
        covered.setdefault(name, set()).add(index)
    conditions = sorted(
        (Condition.from_name(name, student_tokens=run.plan.student_tokens) for name in covered),
        key=_row_order,
    )
    groups = []
    for questions in sorted({frozenset(s) for s in covered.values()}, key=lambda s: (-len(s), sorted(s))):
        rows = [c for c in conditions if covered[c.name] >= questions]
        groups.append((rows, sorted(questions)))
    return groups


def render(root: Path) -> str:
    """The whole report of every kept run, as Markdown, then the rows kept in more than one run."""
    runs = read_runs(root)
    return "\n".join([*(render_run(run) for run in runs), *_repeated_rows(runs)])


def render_run(run: KeptRun) -> str:
    """Each table of a run, with its settings, its statistics and (multiple choice) its answer counts."""
    plan = run.plan
    spec = DATASETS[plan.task]
    parts = [f"## {run.name}", ""]
    for conditions, questions in table_groups(run):
        summary = summarize(
            plan=plan, records=run.records, dataset={"file": spec.file}, conditions=conditions
        )
        by_row = {c.name: [run.records[(c.name, i)] for i in questions] for c in conditions}
        guided = {c.name for c in conditions if c.guided and c.uses_student}
        parts += [
            markdown_table(summary),
            _settings(plan),
            "",
            *_statistics(plan.task, by_row, guided=guided),
            "",
        ]
    return "\n".join(parts)


def _repeated_rows(runs: Sequence[KeptRun]) -> list[str]:
    """Each row that two runs of the same settings (models, seed, sampling) both ran, over the questions
    both finished: how many of its texts (guidance and continuation) are the same, and how many answers
    differ — what decoding students together, or another version of a run, changed."""
    lines = []
    for i, first in enumerate(runs):
        for second in runs[i + 1 :]:
            if _settings_key(first) != _settings_key(second):
                continue
            shared = sorted(first.records.keys() & second.records.keys())
            for condition in sorted({c for c, _ in shared}):
                pairs = [(first.records[key], second.records[key]) for key in shared if key[0] == condition]
                same = sum((a.guidance, a.student_text) == (b.guidance, b.student_text) for a, b in pairs)
                differ = sum(a.answer != b.answer for a, b in pairs)
                lines.append(
                    f"| {condition} | {_label(first)} / {_label(second)} | {len(pairs)} | {same} | {differ} |"
                )
    if not lines:
        return []
    return [
        "## Rows kept in more than one run",
        "",
        "| Row | Runs | Questions in both | Same text | Answers that differ |",
        "|---|---|---:|---:|---:|",
        *lines,
        "",
    ]


def _settings_key(run: KeptRun) -> dict[str, object]:
    """What must match for two runs' rows to be the same rows: everything but how they were run."""
    return {k: v for k, v in run.plan.identity().items() if k != "runner"}


def _label(run: KeptRun) -> str:
    batch = run.plan.extra.get("student_batch_size", 1)
    return f"{run.name} ({run.plan.runner}, students at batch {batch})"


def _row_order(condition: Condition) -> tuple[int, int]:
    kind = condition.name if condition.name in ("student", "teacher") else condition.kind
    return _KIND_ORDER.index(kind), condition.max_guidance_tokens


def _settings(plan: EvalPlan) -> str:
    def sampling(temperature: float | None, top_p: float | None) -> str:
        return "as its server was set" if temperature is None else f"T = {temperature:g}, top-p {top_p:g}"

    return (
        f"Teacher {plan.teacher}: {sampling(plan.teacher_temperature, plan.teacher_top_p)}; "
        f"student {plan.student}: {sampling(plan.student_temperature, plan.student_top_p)}, "
        f"at most {plan.student_tokens} tokens; seed {plan.seed}."
    )


def _statistics(task: Task, by_row: Mapping[str, Sequence[ExampleRecord]], *, guided: set[str]) -> list[str]:
    """Per row: its right answers with their interval, and its paired comparison with the student alone."""
    student = by_row.get("student")
    lines = [
        "| Row | Right | Right, not from the guidance alone | ACC (%) | 95 % CI (Wilson, %) "
        "| Right only for the student alone / only here | McNemar exact p | Teacher time (s) | Student time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, records in by_row.items():
        right = sum(r.correct for r in records)
        # For a guided row, the right answers the guidance alone did not already hold: the student's part.
        beyond = str(sum(r.correct and not r.teacher_correct for r in records)) if name in guided else "—"
        low, high = wilson_interval(right, len(records))
        paired, p_value = "—", "—"
        if student is not None and name != "student":
            only_student, only_here = paired_counts(
                [r.correct for r in student], [r.correct for r in records]
            )
            paired, p_value = f"{only_student} / {only_here}", f"{mcnemar_exact(only_student, only_here):.3g}"
        lines.append(
            f"| {name} | {right}/{len(records)} | {beyond} | {100 * right / len(records):.1f} "
            f"| {100 * low:.1f}–{100 * high:.1f} | {paired} | {p_value} "
            f"| {sum(r.teacher_seconds for r in records):.1f} | {sum(r.student_seconds for r in records):.1f} |"
        )
    if task in (Task.CSQA, Task.AQUA):
        lines += ["", *_letter_counts(by_row)]
    return lines


def _letter_counts(by_row: Mapping[str, Sequence[ExampleRecord]]) -> list[str]:
    """How often each answer letter was given, by row, under how often it is the gold answer."""
    columns = (*_LETTERS, UNPARSED)
    lines = [f"| Answers | {' | '.join(columns)} |", "|---|" + "---:|" * len(columns)]
    first = next(iter(by_row.values()), [])
    gold = answer_counts(r.gold for r in first)
    lines.append(f"| gold | {' | '.join(str(gold[c]) for c in columns)} |")
    for name, records in by_row.items():
        counts = answer_counts(r.answer for r in records)
        lines.append(f"| {name} | {' | '.join(str(counts[c]) for c in columns)} |")
    return lines
