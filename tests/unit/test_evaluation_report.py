"""`gkt eval report`: tables and statistics recomputed from kept, compressed records written by hand."""

from __future__ import annotations

import argparse
import gzip
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from gkt.client import DEFAULT_GATEWAY_ADDR
from gkt.evaluation.archive import read_runs, render, table_groups
from gkt.evaluation.plan import EvalPlan
from gkt.evaluation.records import ARCHIVED_RECORDS_FILE, PLAN_FILE, ExampleRecord, RecordStore
from gkt.evaluation.statistics import answer_counts, mcnemar_exact, paired_counts, wilson_interval
from gkt.jobs import GuidanceMode, Task
from gkt_tools.evaluation import add_arguments, run
from gkt_tools.settings import ToolSettings


def test_wilson_interval_matches_known_values() -> None:
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 2) == pytest.approx((0.0, 0.6576), abs=1e-4)
    assert wilson_interval(71, 300) == pytest.approx((0.1921, 0.2879), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_mcnemar_exact_is_a_two_sided_binomial_test_of_the_discordant_pairs() -> None:
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(9, 1) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_paired_counts_and_answer_counts() -> None:
    assert paired_counts([True, True, False, False], [True, False, True, True]) == (1, 2)
    with pytest.raises(ValueError):
        paired_counts([True], [True, False])
    assert answer_counts(["E", "E", None, "A"]) == {"E": 2, "unparsed": 1, "A": 1}


_PLAN = EvalPlan(
    task=Task.CSQA, teacher="big", student="small", modes=(GuidanceMode.CUTOFF,), max_guidance_tokens=(30,),
    student_tokens=100,
)  # fmt: skip
GOLD = "ABCDEA"
# Six questions; the sweep row cutoff-10 finished only the first two.
ANSWERS: dict[str, list[str | None]] = {
    "student": ["A", "E", "E", "E", "E", "E"],  # right on 0 and 4
    "teacher": ["A", "B", "C", None, "A", "B"],  # right on 0, 1, 2
    "cutoff-30": ["A", "B", "C", "D", "B", "A"],  # right on 0, 1, 2, 3, 5
    "cutoff-10": ["B", "B"],  # right on 1
}


def _kept_run(root: Path, name: str = "csqa-offline") -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / PLAN_FILE).write_text(json.dumps(_PLAN.identity()))
    lines = []
    for row, answers in ANSWERS.items():
        for i, answer in enumerate(answers):
            record = ExampleRecord(
                condition=row, index=i, question=f"q{i}", gold=GOLD[i], seed=i, guidance="",
                guidance_tokens=0, teacher_answer=None, teacher_correct=row == "cutoff-30" and i < 2, student_text="",
                student_tokens=10, answer=answer, correct=answer == GOLD[i], teacher_seconds=1.0 if row != "student" else 0.0,
                student_seconds=2.0, seconds=3.0,
            )  # fmt: skip
            lines.append(json.dumps(asdict(record)))
    with gzip.open(directory / ARCHIVED_RECORDS_FILE, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return directory


def test_rows_share_a_table_over_the_questions_they_all_finished(tmp_path: Path) -> None:
    (kept,) = read_runs(_kept_run(tmp_path).parent)
    groups = [([c.name for c in rows], questions) for rows, questions in table_groups(kept)]
    assert groups == [
        (["student", "teacher", "cutoff-30"], [0, 1, 2, 3, 4, 5]),
        (["student", "teacher", "cutoff-10", "cutoff-30"], [0, 1]),
    ]


def test_report_recomputes_accuracy_paired_tests_and_letter_counts(tmp_path: Path) -> None:
    text = render(_kept_run(tmp_path).parent)
    assert "### CSQA (6 examples: 0-5)" in text and "### CSQA (2 examples: 0-1)" in text
    # cutoff-30 against the student alone: right only for the student on question 4, only here on 1, 2, 3, 5.
    # Its guidance alone held the right answer on questions 0 and 1: the student finished 2, 3 and 5 itself.
    assert "| cutoff-30 | 5/6 | 3 | 83.3 | 43.6–97.0 | 1 / 4 | 0.375 | 6.0 | 12.0 |" in text
    assert "| teacher | 3/6 | — | 50.0 | 18.8–81.2 | 1 / 2 | 1 | 6.0 | 12.0 |" in text
    assert "| cutoff-10 | 1/2 | 1 | 50.0 | 9.5–90.5 | 1 / 1 | 1 | 2.0 | 4.0 |" in text
    assert "| gold | 2 | 1 | 1 | 1 | 1 | 0 |" in text
    assert "| student | 1 | 0 | 0 | 0 | 5 | 0 |" in text and "| teacher | 2 | 2 | 1 | 0 | 0 | 1 |" in text


def test_a_kept_run_resumes_from_its_compressed_records(tmp_path: Path) -> None:
    store = RecordStore(_kept_run(tmp_path), plan=_PLAN)
    assert store.done("cutoff-10", 1) and not store.done("cutoff-10", 2)


def test_the_command_prints_the_report_and_refuses_an_empty_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, default_addr=DEFAULT_GATEWAY_ADDR)
    _kept_run(tmp_path / "kept")
    assert (
        run(parser.parse_args(["report", "--records", str(tmp_path / "kept")]), settings=ToolSettings()) == 0
    )
    assert "## csqa-offline" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert (
        run(parser.parse_args(["report", "--records", str(tmp_path / "empty")]), settings=ToolSettings()) == 2
    )
    assert "no kept runs" in capsys.readouterr().err


def test_every_table_in_the_results_page_is_what_the_report_prints_from_the_kept_records() -> None:
    """docs/results.md states nothing `gkt eval report` does not print: each of its tables (headings and
    rows) appears verbatim in the report recomputed from docs/results/records, and each kept run it links
    to is there."""
    repo = Path(__file__).resolve().parents[2]
    page = (repo / "docs" / "results.md").read_text()
    report = render(repo / "docs" / "results" / "records").splitlines()
    printed, headings = set(report), {line.lstrip("#").strip() for line in report if line.startswith("#")}
    tables = [line for line in page.splitlines() if line.startswith("|")]
    assert len(tables) > 100
    assert [line for line in tables if line not in printed] == []
    table_headings = [line.lstrip("#").strip() for line in page.splitlines() if line.startswith("#### ")]
    assert table_headings and [h for h in table_headings if h not in headings] == []
    linked = set(re.findall(r"\(results/records/([\w-]+)/\)", page))
    assert linked and linked <= {line.removeprefix("## ") for line in report if line.startswith("## ")}


def test_rows_kept_in_two_runs_of_the_same_settings_are_compared_text_by_text(tmp_path: Path) -> None:
    _kept_run(tmp_path, "first")
    second = _kept_run(tmp_path, "second")
    records = [
        json.loads(line)
        for line in gzip.decompress((second / ARCHIVED_RECORDS_FILE).read_bytes()).splitlines()
    ]
    for record in records:
        if record["condition"] == "student" and record["index"] in (1, 2):
            record["student_text"] = "parted ways"  # two texts differ, one of them with another answer
            record["answer"] = "B" if record["index"] == 1 else record["answer"]
    with gzip.open(second / ARCHIVED_RECORDS_FILE, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(r) for r in records) + "\n")
    other_seed = _kept_run(tmp_path, "third")
    (other_seed / PLAN_FILE).write_text(json.dumps({**_PLAN.identity(), "seed": 1}))

    text = render(tmp_path)
    both = "first (offline, students at batch 1) / second (offline, students at batch 1)"
    assert f"| student | {both} | 6 | 4 | 1 |" in text
    assert f"| cutoff-10 | {both} | 2 | 2 | 0 |" in text
    assert "third (offline" not in text  # another seed: other rows, never compared
