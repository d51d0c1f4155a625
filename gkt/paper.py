"""The GKT paper's vocabulary and settings (arXiv 2405.19635 and its public scripts), in one place.

Its tasks and guidance modes, and per task the guidance length N and the student's length, the sampling
of teacher and student, and the teacher's batch size. The gateway's defaults for a request, the jobs, the
evaluation and the `gkt` command all read them here. FREEFORM (a plain question, no exemplars) is this
project's addition; its lengths are ours, not the paper's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Task(enum.StrEnum):
    """Which prompt family a query belongs to."""

    FREEFORM = "freeform"
    GSM8K = "gsm8k"
    CSQA = "csqa"
    AQUA = "aqua"


class GuidanceMode(enum.StrEnum):
    """The guidance projection F: how the teacher's output becomes the student's prefix."""

    CUTOFF = "cutoff"
    CONCISE = "concise"
    HINT = "hint"
    NONE = "none"
    FULL = "full"


GKT_MODES = (GuidanceMode.CUTOFF, GuidanceMode.CONCISE, GuidanceMode.HINT)
"""The modes in which a teacher's guidance and a student's completion make the answer together."""


@dataclass(frozen=True, kw_only=True)
class TaskDefaults:
    """The paper's setting for one task."""

    few_shot: int
    """Manual-CoT exemplars in the task prompt (`gkt.prompts`)."""
    max_guidance_tokens: int
    """N: the teacher tokens of guidance."""
    student_max_new_tokens: int
    """The most tokens the student adds; also the teacher's length when it answers alone (FULL)."""


TASK_DEFAULTS: dict[Task, TaskDefaults] = {
    Task.GSM8K: TaskDefaults(few_shot=8, max_guidance_tokens=40, student_max_new_tokens=300),
    Task.CSQA: TaskDefaults(few_shot=7, max_guidance_tokens=30, student_max_new_tokens=100),
    Task.AQUA: TaskDefaults(few_shot=4, max_guidance_tokens=20, student_max_new_tokens=100),
    Task.FREEFORM: TaskDefaults(few_shot=0, max_guidance_tokens=20, student_max_new_tokens=256),
}

TEACHER_TEMPERATURE = 0.8
TEACHER_TOP_P = 0.9
STUDENT_TEMPERATURE = 0.8
STUDENT_TOP_P = 0.95
TEACHER_BATCH_SIZE = 10
"""The smallest of the paper's teacher batches (10 to 32); students run one job at a time."""
