"""Evaluation datasets: where each file comes from, and loading it verified (the paper's settings for each
task are in `gkt.paper`).

The files are never part of the project: they are read from a data directory that holds them next to a
`SHA256SUMS` file (`sha256sum` format), and every file is checked against its sum before it is used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from gkt.answers import format_record, gold_answer
from gkt.evaluation.oracle import reference_solution
from gkt.jobs import Task

SUMS_FILE = "SHA256SUMS"
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class DatasetSpec:
    """One evaluation set: its file, size, origin and the sum of the copy the published results used."""

    task: Task
    file: str
    records: int
    source: str
    published_sha256: str
    """The sum of the copy the published results used; a data directory with another copy still runs,
    but its summary says so."""


DATASETS: dict[Task, DatasetSpec] = {
    spec.task: spec
    for spec in (
        DatasetSpec(
            task=Task.GSM8K,
            file="gsm8k_test.jsonl",
            records=1319,
            source="GSM8K test split: github.com/openai/grade-school-math, grade_school_math/data/test.jsonl (MIT)",
            published_sha256="3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
        ),
        DatasetSpec(
            task=Task.CSQA,
            file="csqa_dev.jsonl",
            records=1221,
            source="CommonsenseQA dev split (dev_rand_split.jsonl): github.com/kojima-takeshi188/zero_shot_cot, "
            "dataset/CommonsenseQA/dev_rand_split.jsonl (MIT)",
            published_sha256="3210497fdaae614ac085d9eb873dd7f4d49b6f965a93adadc803e1229fd8a02a",
        ),
        DatasetSpec(
            task=Task.AQUA,
            file="aqua_test.jsonl",
            records=254,
            source="AQuA-RAT test split: github.com/google-deepmind/AQuA, test.json (Apache-2.0)",
            published_sha256="de41581881ef95c5588c44ddc701c77fd480839241dd422a0d181262af24520c",
        ),
    )
}


class DataError(RuntimeError):
    """The data directory is missing, incomplete, or holds a file whose sha256 does not match."""


@dataclass(frozen=True)
class Example:
    """One question of a dataset, by its position in the file."""

    index: int
    query: str
    gold: str
    reference: str | None = None
    """The record's worked solution (`gkt.evaluation.oracle`), for oracle rows only; None when it has none."""


@dataclass(frozen=True)
class LoadedDataset:
    spec: DatasetSpec
    path: Path
    sha256: str
    examples: list[Example]

    @property
    def published_copy(self) -> bool:
        return self.sha256 == self.spec.published_sha256


def resolve_data_dir(chosen: Path | None) -> Path:
    """The data directory `chosen` (`--data-dir`, else GKT_DATA_DIR), else `../shared/data` next to the
    repository."""
    if chosen is not None:
        return chosen
    return _REPO_ROOT.parent / "shared" / "data"


def load_dataset(*, task: Task, data_dir: Path, limit: int | None = None) -> LoadedDataset:
    """The first `limit` examples of a task's file, after checking the whole file's sha256."""
    spec = DATASETS.get(task)
    if spec is None:
        raise DataError(f"task {task.value!r} has no evaluation set; choose one of {', '.join(DATASETS)}")
    path = data_dir / spec.file
    sums = data_dir / SUMS_FILE
    missing = [p.name for p in (path, sums) if not p.is_file()]
    if missing:
        raise DataError(
            f"{', '.join(missing)} missing from the data directory {data_dir} "
            f"(set --data-dir or $GKT_DATA_DIR). {spec.file} is the {spec.source}; "
            f"{SUMS_FILE} lists it as `<sha256>  {spec.file}`, sha256 {spec.published_sha256}."
        )
    expected = _expected_sum(sums, spec.file)
    actual = _sha256(path)
    if actual != expected:
        raise DataError(
            f"{path} has sha256 {actual}, but {sums} says {expected}: the file is damaged or edited"
        )
    examples = []
    with path.open(encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if limit is not None and index >= limit:
                break
            record = json.loads(line)
            examples.append(
                Example(
                    index=index,
                    query=format_record(task=task, record=record),
                    gold=gold_answer(task=task, record=record),
                    reference=reference_solution(task=task, record=record),
                )
            )
    return LoadedDataset(spec=spec, path=path, sha256=actual, examples=examples)


def _expected_sum(sums: Path, name: str) -> str:
    for line in sums.read_text(encoding="utf-8").splitlines():
        digest, _, listed = line.strip().partition(" ")
        if listed.strip().lstrip("*") == name:
            return digest.lower()
    raise DataError(f"{sums} has no line for {name}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
