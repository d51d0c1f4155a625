"""The offline runner: the paper's setting in one process — a batched teacher, then students at batch 1
(or, with `student_batch_size` above 1, the students of a chunk decoded together, in less time: each row
samples from its own seed whatever its batch-mates, so its text is the same as alone as far as floating
point allows (docs/students.md, "Seeded determinism"); each student's time is then its share of its
batch's).

It drives the serving code itself rather than a copy of it: prompts from `gkt.prompts`, models from
`gkt.models`, and every generation through `gkt.engine` (the engine the students and the local teacher
backend serve with), with the teacher worker's projection (mode prompt, first N tokens, stripped). Oracle rows (evaluation
only) take the same projection of the reference solution instead, in the teacher's tokens, and load no
teacher model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gkt.decoding import PrefixCache, encode, few_shot_prefixes
from gkt.engine import Engine, EngineRequest, EngineResult, Sampler
from gkt.evaluation.datasets import Example
from gkt.evaluation.oracle import oracle_guidance
from gkt.evaluation.plan import Condition, EvalPlan
from gkt.evaluation.records import ExampleRecord
from gkt.evaluation.scoring import score_example
from gkt.models import LoadedModel, load_model, load_tokenizer
from gkt.prompts import STOP_SEQUENCE, student_prompt, teacher_prompt


class OfflineRunner:
    """Loads both models on first use; `run_chunk` answers a batch of examples for one row."""

    def __init__(
        self,
        *,
        plan: EvalPlan,
        cache_dir: Path,
        device: str = "cpu",
        dtype: str = "float32",
        student_batch_size: int = 1,
    ) -> None:
        self.plan = plan
        self.student_batch_size = student_batch_size
        self._cache_dir, self._device, self._dtype = cache_dir, device, dtype
        self._teacher: Engine | None = None
        self._student: Engine | None = None
        self._teacher_tokenizer: Any = None

    def run_chunk(self, condition: Condition, examples: Sequence[Example]) -> list[ExampleRecord]:
        """One teacher batch for the chunk (unless the row has no teacher), then its students."""
        teacher_results, teacher_seconds = self._guidance(condition, examples)
        teacher_share = teacher_seconds / len(examples)
        guidances = [teacher.text.strip() for teacher in teacher_results]
        completions = (
            self._complete(examples, guidances)
            if condition.uses_student
            else [("", 0, 0.0) for _ in examples]
        )
        records = []
        for example, teacher, guidance, (student_text, student_tokens, student_seconds) in zip(
            examples, teacher_results, guidances, completions, strict=True
        ):
            records.append(
                score_example(
                    task=self.plan.task,
                    condition=condition,
                    example=example,
                    seed=self.plan.example_seed(example.index),
                    guidance=guidance,
                    guidance_tokens=teacher.token_count,
                    student_text=student_text,
                    student_tokens=student_tokens,
                    teacher_seconds=teacher_share,
                    student_seconds=student_seconds,
                    seconds=teacher_share + student_seconds,
                    teacher_batch_size=len(examples) if condition.uses_teacher else 0,
                    student_batch_size=self.student_batch_size if condition.uses_student else 0,
                )
            )
        return records

    def _guidance(
        self, condition: Condition, examples: Sequence[Example]
    ) -> tuple[list[EngineResult], float]:
        if condition.oracle:
            return [self._oracle(example, condition.max_guidance_tokens) for example in examples], 0.0
        if not condition.uses_teacher:
            return [EngineResult(text="", token_count=0, finish_reason="none") for _ in examples], 0.0
        teacher = self._engine("teacher")
        requests = [
            _request(
                teacher.lm,
                prompt=teacher_prompt(
                    task=self.plan.task,
                    mode=condition.mode,
                    query=example.query,
                    exemplar_set=self.plan.exemplar_set,
                ),
                max_new_tokens=condition.max_guidance_tokens,
                temperature=_given(self.plan.teacher_temperature),
                top_p=_given(self.plan.teacher_top_p),
                seed=self.plan.example_seed(example.index),
            )
            for example in examples
        ]
        started = time.perf_counter()
        results = teacher.generate(requests)
        return results, time.perf_counter() - started

    def _oracle(self, example: Example, max_tokens: int) -> EngineResult:
        """The reference solution's first N tokens, counted in the teacher's tokenizer like its guidance."""
        if self._teacher_tokenizer is None:
            self._teacher_tokenizer = load_tokenizer(name=self.plan.teacher, cache_dir=self._cache_dir)
        text, tokens = oracle_guidance(
            reference=example.reference, tokenizer=self._teacher_tokenizer, max_tokens=max_tokens
        )
        return EngineResult(text=text, token_count=tokens, finish_reason="length")

    def _complete(
        self, examples: Sequence[Example], guidances: Sequence[str]
    ) -> list[tuple[str, int, float]]:
        """Each student's continuation: (text, tokens, seconds). At batch size 1 one at a time, as a Celery
        student serving one job would run it; above, `student_batch_size` at once."""
        student = self._engine("student")
        requests = [
            _request(
                student.lm,
                prompt=student_prompt(
                    task=self.plan.task,
                    query=example.query,
                    guidance=guidance,
                    exemplar_set=self.plan.exemplar_set,
                ),
                max_new_tokens=self.plan.student_tokens,
                temperature=self.plan.student_temperature,
                top_p=self.plan.student_top_p,
                seed=self.plan.example_seed(example.index),
            )
            for example, guidance in zip(examples, guidances, strict=True)
        ]
        completions = []
        for start in range(0, len(requests), self.student_batch_size):
            batch = requests[start : start + self.student_batch_size]
            started = time.perf_counter()
            results = student.generate(batch)
            share = (time.perf_counter() - started) / len(batch)
            for result, guidance in zip(results, guidances[start : start + len(batch)], strict=True):
                # With no guidance the prompt ends at "A:", and the answer starts after the space the model
                # writes.
                text = result.text if guidance else result.text.lstrip()
                completions.append((text, result.token_count, share))
        return completions

    def _engine(self, role: str) -> Engine:
        if role == "teacher":
            self._teacher = self._teacher or _engine(self._load(self.plan.teacher))
            return self._teacher
        self._student = self._student or _engine(self._load(self.plan.student))
        return self._student

    def _load(self, name: str) -> LoadedModel:
        return load_model(name=name, cache_dir=self._cache_dir, device=self._device, dtype=self._dtype)


def _engine(lm: LoadedModel) -> Engine:
    """An engine with the few-shot prefixes cached, as the serving workers build theirs."""
    return Engine(lm, max_batch=256, prefix_cache=PrefixCache(lm, texts=few_shot_prefixes()))


def _request(
    lm: LoadedModel, *, prompt: str, max_new_tokens: int, temperature: float, top_p: float, seed: int
) -> EngineRequest:
    """One row: the prompt, sampled with its own seed, stopping at the next question."""
    return EngineRequest(
        prompt_ids=encode(lm, prompt),
        sampler=Sampler(temperature=temperature, top_p=top_p, seed=seed),
        max_new_tokens=max_new_tokens,
        stop=(STOP_SEQUENCE,),
        prompt=prompt,
    )


def _given(value: float | None) -> float:
    if value is None:
        raise ValueError("an offline run needs the teacher's sampling settings in its plan")
    return value
