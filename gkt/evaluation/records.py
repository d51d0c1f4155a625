"""Per-example results: one JSON line per (row, example), appended as soon as the example is done.

The output directory makes a run resumable: `plan.json` pins the settings, `records.jsonl` holds every
finished example, and a rerun skips what is already there. A kept run's records are compressed in place
(`gzip -9 records.jsonl` makes `records.jsonl.gz`), and read back from there just the same.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gkt.evaluation.plan import EvalPlan

PLAN_FILE = "plan.json"
RECORDS_FILE = "records.jsonl"
ARCHIVED_RECORDS_FILE = "records.jsonl.gz"


@dataclass(frozen=True, kw_only=True)
class ExampleRecord:
    """What one row did on one example, and how long it took."""

    condition: str
    index: int
    question: str
    gold: str
    seed: int
    guidance: str
    guidance_tokens: int
    teacher_answer: str | None
    """The answer read from the guidance alone (ACC_teacher); None when it holds none."""
    teacher_correct: bool
    student_text: str
    """The student's continuation after the guidance (empty for the teacher-alone row)."""
    student_tokens: int
    answer: str | None
    """The answer read from guidance + continuation; None (scored wrong) when there is none."""
    correct: bool
    teacher_seconds: float
    """This example's share of its teacher batch (batch time / batch size)."""
    student_seconds: float
    seconds: float
    """This example's share of the row's wall time: what the row's total time is summed from."""
    teacher_batch_size: int = 0
    student_batch_size: int = 0
    """Offline runs: how many students were decoded together (`--student-batch-size`); 0 where not
    recorded (live runs, and offline runs before it was, all of which ran their students one at a time)."""
    latency_seconds: float = 0.0
    """Live runs: the request's own time as the gateway measured it."""


class RecordStore:
    """The records of one output directory, loaded once and appended to line by line."""

    def __init__(self, directory: Path, *, plan: EvalPlan) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        _check_plan(directory / PLAN_FILE, plan)
        self._path = directory / RECORDS_FILE
        self.records = read_records(directory)

    def done(self, condition: str, index: int) -> bool:
        return (condition, index) in self.records

    def add(self, record: ExampleRecord) -> None:
        with self._path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
        self.records[(record.condition, record.index)] = record


def read_records(directory: Path) -> dict[tuple[str, int], ExampleRecord]:
    """A directory's records by (row, example): the compressed ones, then those appended since."""
    lines: list[str] = []
    if (directory / ARCHIVED_RECORDS_FILE).exists():
        with gzip.open(directory / ARCHIVED_RECORDS_FILE, "rt", encoding="utf-8") as archived:
            lines += archived.read().splitlines()
    if (directory / RECORDS_FILE).exists():
        lines += (directory / RECORDS_FILE).read_text(encoding="utf-8").splitlines()
    records = {}
    for line in lines:
        if line.strip():
            record = ExampleRecord(**json.loads(line))
            records[(record.condition, record.index)] = record
    return records


def _check_plan(path: Path, plan: EvalPlan) -> None:
    """Records made under other settings (models, seed, sampling, prompts) must never be mixed in."""
    identity = plan.identity()
    if path.exists():
        stored: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        differing = {k: (stored.get(k), v) for k, v in identity.items() if stored.get(k) != v}
        if differing:
            details = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differing.items())
            raise ValueError(
                f"{path.parent} holds a run with other settings ({details}); choose another --out"
            )
        return
    path.write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
