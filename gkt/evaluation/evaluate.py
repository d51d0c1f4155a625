"""The evaluation loop: example chunks in dataset order, every row per chunk, records saved as they come.

Chunk-major order (chunk 1 in every row, then chunk 2 …) keeps the rows level, so a run stopped at any
point still reports every row over the same examples, and a rerun resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from gkt import paper
from gkt.evaluation.datasets import Example, LoadedDataset
from gkt.evaluation.plan import Condition, EvalPlan
from gkt.evaluation.records import ExampleRecord, RecordStore
from gkt.evaluation.report import summarize, write_report


class Runner(Protocol):
    """Answers a chunk of examples for one row: `offline.OfflineRunner` or `live.LiveRunner`."""

    def run_chunk(self, condition: Condition, examples: Sequence[Example]) -> list[ExampleRecord]: ...


def evaluate(
    *,
    plan: EvalPlan,
    dataset: LoadedDataset,
    store: RecordStore,
    runner: Runner,
    chunk_size: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Run what the store lacks, then write and return the summary."""
    conditions = plan.conditions()
    todo = sum(not store.done(c.name, e.index) for c in conditions for e in dataset.examples)
    with tqdm(
        total=todo, unit="answer", desc=f"{plan.task.value} {plan.runner}", disable=not progress
    ) as bar:
        for start in range(0, len(dataset.examples), chunk_size):
            chunk = dataset.examples[start : start + chunk_size]
            for condition in conditions:
                pending = [e for e in chunk if not store.done(condition.name, e.index)]
                if not pending:
                    continue
                bar.set_postfix_str(condition.name)
                for record in runner.run_chunk(condition, pending):
                    store.add(record)
                bar.update(len(pending))
    return report(plan=plan, dataset=dataset, store=store)


def report(*, plan: EvalPlan, dataset: LoadedDataset, store: RecordStore) -> dict[str, Any]:
    """Summarise the store's records and write summary.json, table.md and the plots next to them."""
    summary = summarize(plan=plan, records=store.records, dataset=describe_dataset(dataset))
    write_report(summary, store.directory)
    return summary


def describe_dataset(dataset: LoadedDataset) -> dict[str, Any]:
    spec = dataset.spec
    return {
        "file": spec.file,
        "path": str(Path(dataset.path).resolve()),
        "sha256": dataset.sha256,
        "published_copy": dataset.published_copy,
        "source": spec.source,
        "few_shot": paper.TASK_DEFAULTS[spec.task].few_shot,
        "requested_examples": len(dataset.examples),
    }
