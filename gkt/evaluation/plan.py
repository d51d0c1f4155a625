"""The evaluation plan: which rows (conditions) to run, with which models, sampling and seeds."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from gkt import paper
from gkt.evaluation.oracle import ORACLE
from gkt.paper import GuidanceMode, Task
from gkt.prompts import ExemplarSet


@dataclass(frozen=True)
class Condition:
    """One row of the report: the student alone, the teacher alone, GKT with one mode and length N, or the
    oracle (evaluation only: the first N tokens of the reference solution in place of a teacher's)."""

    mode: GuidanceMode
    max_guidance_tokens: int = 0
    """N for the GKT modes; the length of the teacher's whole answer for the teacher-alone row."""
    oracle: bool = False

    @property
    def name(self) -> str:
        if self.mode is GuidanceMode.NONE:
            return "student"
        if self.mode is GuidanceMode.FULL:
            return "teacher"
        return f"{self.kind}-{self.max_guidance_tokens}"

    @property
    def kind(self) -> str:
        """The guidance mode's name, or `oracle`."""
        return ORACLE if self.oracle else self.mode.value

    @property
    def guided(self) -> bool:
        """Whether the student starts from guidance (a teacher's or the oracle's), scored on its own too."""
        return self.mode is not GuidanceMode.NONE

    @property
    def uses_teacher(self) -> bool:
        return self.guided and not self.oracle

    @property
    def uses_student(self) -> bool:
        return self.mode is not GuidanceMode.FULL

    @classmethod
    def from_name(cls, name: str, *, student_tokens: int) -> Condition:
        """The row a record's `condition` names: `student`, `teacher`, `cutoff-30`, `oracle-20`."""
        if name == "student":
            return cls(GuidanceMode.NONE)
        if name == "teacher":
            return cls(GuidanceMode.FULL, student_tokens)
        kind, _, n = name.rpartition("-")
        if kind == ORACLE:
            return cls(GuidanceMode.CUTOFF, int(n), oracle=True)
        return cls(GuidanceMode(kind), int(n))


@dataclass(frozen=True, kw_only=True)
class EvalPlan:
    """Everything that decides an example's result; a resumed run must have the same plan."""

    task: Task
    teacher: str
    student: str
    modes: tuple[GuidanceMode, ...]
    max_guidance_tokens: tuple[int, ...]
    student_tokens: int
    seed: int = 0
    exemplar_set: ExemplarSet = ExemplarSet.CORRECTED
    teacher_temperature: float | None = paper.TEACHER_TEMPERATURE
    """None: set by the server (live runs: GKT_TEACHER_TEMPERATURE), not by the request."""
    teacher_top_p: float | None = paper.TEACHER_TOP_P
    student_temperature: float = paper.STUDENT_TEMPERATURE
    student_top_p: float = paper.STUDENT_TOP_P
    runner: str = "offline"
    baselines: tuple[GuidanceMode, ...] = (GuidanceMode.NONE, GuidanceMode.FULL)
    """The rows without guidance: NONE the student alone, FULL the teacher alone."""
    oracle: bool = False
    """Oracle rows (evaluation only) at every N, after the GKT modes'."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Runner settings that do not change answers (batch size, concurrency), recorded for the reader."""

    def conditions(self) -> list[Condition]:
        rows = [Condition(GuidanceMode.NONE)] if GuidanceMode.NONE in self.baselines else []
        if GuidanceMode.FULL in self.baselines:
            rows.append(Condition(GuidanceMode.FULL, self.student_tokens))
        rows += [Condition(mode, n) for mode in self.modes for n in self.max_guidance_tokens]
        if self.oracle:
            rows += [Condition(GuidanceMode.CUTOFF, n, oracle=True) for n in self.max_guidance_tokens]
        return rows

    def example_seed(self, index: int) -> int:
        """A seed per example, the same in every row and every run, independent of batch-mates."""
        material = f"{self.seed}:{index}".encode()
        return int.from_bytes(hashlib.sha256(material).digest()[:4], "big") >> 1

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the records it extends."""
        data = asdict(self)
        for free in ("modes", "max_guidance_tokens", "baselines", "oracle", "extra"):
            data.pop(free)
        return {k: (v.value if hasattr(v, "value") else v) for k, v in data.items()}
