"""The oracle teacher, for evaluation only: guidance cut from the dataset's own reference solution.

It is no serving mode and no teacher a user can ask for: it reads the answer key. A row guided by it
shows what the first N tokens of a correct worked solution give the student — an upper bound on what a
perfect teacher's N tokens could give it — and so whether this student can use guidance at all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from gkt.jobs import Task

ORACLE = "oracle"
"""The `--guidance` word and the row-name prefix of oracle rows (`oracle-20`)."""

_CALCULATOR_MARK = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL = re.compile(r"\n?####\s*(?P<answer>.+?)\s*$", re.DOTALL)


class OracleError(ValueError):
    """The dataset has no reference solution to cut guidance from."""


class Tokenizer(Protocol):
    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str: ...


def reference_solution(*, task: Task, record: Mapping[str, Any]) -> str | None:
    """The worked solution a record holds, written as the exemplars write theirs; None when it holds none.

    GSM8K: the worked answer without its `<<…>>` calculator marks, on one line like the exemplars' answers,
    its closing `#### X` written as their "The answer is X.". AQuA: the rationale as published. CSQA: none.
    """
    match task:
        case Task.GSM8K:
            worked = _CALCULATOR_MARK.sub("", str(record["answer"]))
            final = _GSM8K_FINAL.search(worked)
            steps = " ".join(worked[: final.start() if final else None].split())
            return f"{steps} The answer is {final['answer']}." if final else steps
        case Task.AQUA:
            rationale = str(record.get("rationale") or "").strip()
            return rationale or None
    return None


def oracle_guidance(*, reference: str | None, tokenizer: Tokenizer, max_tokens: int) -> tuple[str, int]:
    """The first `max_tokens` tokens of the reference, decoded and stripped, as the teacher's cutoff does."""
    if reference is None:
        raise OracleError("this dataset has no reference solutions: the oracle guidance needs GSM8K or AQuA")
    ids = list(tokenizer(reference, add_special_tokens=False)["input_ids"])[:max_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids)


def check_oracle_task(task: Task) -> None:
    """Refuse, before any model loads, an oracle row on a dataset without reference solutions."""
    if task not in (Task.GSM8K, Task.AQUA):
        raise OracleError(
            f"--guidance {ORACLE} needs reference solutions, which {task.value} does not have "
            f"(GSM8K has worked answers, AQuA rationales)"
        )
