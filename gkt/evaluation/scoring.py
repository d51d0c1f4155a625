"""Scoring one example of one row: the answer of the whole text and of the guidance alone."""

from __future__ import annotations

from gkt.answers import extract_answer, is_correct
from gkt.evaluation.datasets import Example
from gkt.evaluation.plan import Condition
from gkt.evaluation.records import ExampleRecord
from gkt.jobs import Task


def score_example(
    *,
    task: Task,
    condition: Condition,
    example: Example,
    seed: int,
    guidance: str,
    guidance_tokens: int,
    student_text: str,
    student_tokens: int,
    teacher_seconds: float,
    student_seconds: float,
    seconds: float,
    teacher_batch_size: int = 0,
    student_batch_size: int = 0,
    latency_seconds: float = 0.0,
) -> ExampleRecord:
    """The record of one example: only generated text is scored, never the prompt's exemplars."""
    answer = extract_answer(task=task, text=guidance + student_text)
    teacher_answer = extract_answer(task=task, text=guidance) if condition.guided else None
    return ExampleRecord(
        condition=condition.name,
        index=example.index,
        question=example.query,
        gold=example.gold,
        seed=seed,
        guidance=guidance,
        guidance_tokens=guidance_tokens,
        teacher_answer=teacher_answer,
        teacher_correct=is_correct(task=task, predicted=teacher_answer, gold=example.gold),
        student_text=student_text,
        student_tokens=student_tokens,
        answer=answer,
        correct=is_correct(task=task, predicted=answer, gold=example.gold),
        teacher_seconds=teacher_seconds,
        student_seconds=student_seconds,
        seconds=seconds,
        teacher_batch_size=teacher_batch_size,
        student_batch_size=student_batch_size,
        latency_seconds=latency_seconds,
    )
