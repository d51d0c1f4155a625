"""Evaluation: data directory checks, the plan's rows and seeds, resumable records, and Table 2's arithmetic."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest

from gkt.client import DEFAULT_GATEWAY_ADDR
from gkt.evaluation.datasets import DATASETS, SUMS_FILE, DataError, load_dataset, resolve_data_dir
from gkt.evaluation.plan import Condition, EvalPlan
from gkt.evaluation.records import ExampleRecord, RecordStore
from gkt.evaluation.report import markdown_table, summarize, write_report
from gkt.jobs import GuidanceMode, Task
from gkt_tools.evaluation import add_arguments, build_plan
from gkt_tools.settings import ToolSettings

GSM8K_LINES = [
    {
        "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
        "answer": "3+4=7\n#### 7",
    },
    {"question": "A shop sells 1,200 pens at $2. How much money?", "answer": "1200*2\n#### 2,400"},
    {"question": "It was 5 degrees and fell by 12. What is it now?", "answer": "5-12\n#### -7"},
    {"question": "Half of 5 apples is how many?", "answer": "5/2\n#### 2.5"},
]
CSQA_LINES = [
    {
        "answerKey": key,
        "id": f"q{i}",
        "question": {
            "question_concept": "fish",
            "stem": f"Where is fish number {i} likely to live?",
            "choices": [
                {"label": label, "text": text}
                for label, text in zip("ABCDE", ["desert", "river", "sky", "oven", "attic"], strict=True)
            ],
        },
    }
    for i, key in enumerate("BBAC")
]


def write_data_dir(directory: Path, task: Task, lines: list[dict]) -> Path:
    """A data directory holding one hand-written dataset file and its SHA256SUMS."""
    directory.mkdir(parents=True, exist_ok=True)
    spec = DATASETS[task]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    (directory / spec.file).write_bytes(content)
    (directory / SUMS_FILE).write_text(f"{hashlib.sha256(content).hexdigest()}  {spec.file}\n")
    return directory


def test_dataset_is_loaded_after_its_sum_is_checked(tmp_path: Path) -> None:
    data = write_data_dir(tmp_path, Task.GSM8K, GSM8K_LINES)
    dataset = load_dataset(task=Task.GSM8K, data_dir=data, limit=3)
    assert [e.gold for e in dataset.examples] == ["7", "2400", "-7"]
    assert [e.index for e in dataset.examples] == [0, 1, 2]
    assert dataset.examples[0].query == GSM8K_LINES[0]["question"]
    assert not dataset.published_copy


def test_choice_dataset_gets_its_answer_choices(tmp_path: Path) -> None:
    dataset = load_dataset(task=Task.CSQA, data_dir=write_data_dir(tmp_path, Task.CSQA, CSQA_LINES))
    assert dataset.examples[2].gold == "A"
    assert dataset.examples[0].query.endswith(
        "\nAnswer Choices: (A) desert (B) river (C) sky (D) oven (E) attic"
    )


def test_missing_files_are_named_with_their_source(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_dataset(task=Task.AQUA, data_dir=tmp_path)
    message = str(error.value)
    assert "aqua_test.jsonl" in message and SUMS_FILE in message
    assert "google-deepmind/AQuA" in message and DATASETS[Task.AQUA].published_sha256 in message


def test_an_edited_file_is_refused(tmp_path: Path) -> None:
    data = write_data_dir(tmp_path, Task.GSM8K, GSM8K_LINES)
    with (data / "gsm8k_test.jsonl").open("a") as handle:
        handle.write(json.dumps(GSM8K_LINES[0]) + "\n")
    with pytest.raises(DataError, match="sha256"):
        load_dataset(task=Task.GSM8K, data_dir=data)


def test_data_dir_comes_from_the_option_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GKT_DATA_DIR", str(tmp_path / "env"))
    assert ToolSettings().data_dir_for(tmp_path / "option") == tmp_path / "option"
    assert ToolSettings().data_dir_for(None) == tmp_path / "env"
    monkeypatch.delenv("GKT_DATA_DIR")
    assert ToolSettings().data_dir_for(None).parts[-2:] == ("shared", "data")
    assert resolve_data_dir(None) == ToolSettings().data_dir_for(None)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, default_addr=DEFAULT_GATEWAY_ADDR)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("dataset", "n", "student_tokens"), [("gsm8k", 40, 300), ("csqa", 30, 100), ("aqua", 20, 100)]
)
def test_plan_defaults_are_the_papers(dataset: str, n: int, student_tokens: int) -> None:
    plan = build_plan(_args("--dataset", dataset))
    assert plan.max_guidance_tokens == (n,)
    assert plan.student_tokens == student_tokens
    assert (plan.teacher_temperature, plan.teacher_top_p) == (0.8, 0.9)
    assert (plan.student_temperature, plan.student_top_p) == (0.8, 0.95)
    assert [c.name for c in plan.conditions()] == ["student", "teacher", f"cutoff-{n}"]


def test_plan_sweeps_modes_and_lengths() -> None:
    plan = build_plan(_args("--guidance", "cutoff,hint", "--guidance-tokens", "10,20", "--greedy"))
    names = [c.name for c in plan.conditions()]
    assert names == ["student", "teacher", "cutoff-10", "cutoff-20", "hint-10", "hint-20"]
    assert plan.conditions()[1] == Condition(GuidanceMode.FULL, 100)
    assert plan.teacher_temperature == plan.student_temperature == 0.0


@pytest.mark.parametrize(
    "argv",
    [
        ("--guidance", "none"),
        ("--guidance-tokens", "0"),
        ("--models", "only-one"),
        ("live", "--exemplars", "paper"),
    ],
)
def test_plan_refuses_what_it_cannot_run(argv: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        build_plan(_args(*argv))


def test_example_seeds_are_stable_and_distinct() -> None:
    plan = build_plan(_args())
    seeds = [plan.example_seed(i) for i in range(100)]
    assert len(set(seeds)) == 100
    assert seeds == [build_plan(_args()).example_seed(i) for i in range(100)]
    assert seeds != [build_plan(_args("--seed", "1")).example_seed(i) for i in range(100)]


def _plan() -> EvalPlan:
    return EvalPlan(
        task=Task.GSM8K, teacher="big", student="small", modes=(GuidanceMode.CUTOFF,), max_guidance_tokens=(10, 20),
        student_tokens=300,
    )  # fmt: skip


def _record(condition: str, index: int, *, correct: bool, seconds: float, teacher_correct: bool = False,
            answer: str | None = "1") -> ExampleRecord:  # fmt: skip
    return ExampleRecord(
        condition=condition, index=index, question="q", gold="1", seed=index, guidance="g", guidance_tokens=10,
        teacher_answer=None, teacher_correct=teacher_correct, student_text="s", student_tokens=20, answer=answer,
        correct=correct, teacher_seconds=seconds / 2, student_seconds=seconds / 2, seconds=seconds,
    )  # fmt: skip


def test_records_resume_and_refuse_other_settings(tmp_path: Path) -> None:
    store = RecordStore(tmp_path, plan=_plan())
    store.add(_record("student", 0, correct=True, seconds=1.0))
    reopened = RecordStore(tmp_path, plan=_plan())
    assert reopened.done("student", 0) and not reopened.done("student", 1)
    assert reopened.records[("student", 0)] == store.records[("student", 0)]
    other = EvalPlan(**{**_plan().__dict__, "seed": 5})
    with pytest.raises(ValueError, match="seed"):
        RecordStore(tmp_path, plan=other)


def _hand_written_records() -> dict[tuple[str, int], ExampleRecord]:
    """4 examples: student 1/4 right, teacher 3/4, cutoff-10 2/4 (guidance alone 1/4), cutoff-20 4/4;
    teacher-alone takes 8 s an example, cutoff-10 2 s, cutoff-20 4 s, the student 1 s."""
    rows = {
        "student": ([True, False, False, False], 1.0, [False] * 4),
        "teacher": ([True, True, True, False], 8.0, [True, True, True, False]),
        "cutoff-10": ([True, True, False, False], 2.0, [True, False, False, False]),
        "cutoff-20": ([True, True, True, True], 4.0, [False] * 4),
    }
    records = {
        (name, i): _record(
            name, i, correct=c, seconds=seconds, teacher_correct=t, answer=None if not c and i == 3 else "1"
        )
        for name, (correct, seconds, teacher) in rows.items()
        for i, (c, t) in enumerate(zip(correct, teacher, strict=True))
    }
    # A fifth example finished by only one row (an interrupted run) must not enter any row.
    records[("student", 4)] = _record("student", 4, correct=True, seconds=100.0)
    return records


def test_table_two_arithmetic_over_the_examples_every_row_finished() -> None:
    summary = summarize(plan=_plan(), records=_hand_written_records(), dataset={"file": "x"})
    rows = {row["name"]: row for row in summary["rows"]}
    assert summary["examples"] == 4 and summary["example_indices"] == "0-3"
    assert rows["student"]["acc"] == 0.25 and rows["student"]["acc_teacher"] is None
    assert rows["teacher"]["acc"] == 0.75 and rows["teacher"]["delta_acc"] == pytest.approx(0.5)
    assert rows["cutoff-10"]["acc"] == 0.5 and rows["cutoff-10"]["acc_teacher"] == 0.25
    assert rows["cutoff-10"]["delta_acc"] == pytest.approx(0.25)
    assert rows["cutoff-20"]["delta_acc"] == pytest.approx(0.75)
    assert rows["teacher"]["total_seconds"] == 32.0 and rows["cutoff-10"]["total_seconds"] == 8.0
    assert rows["cutoff-10"]["teacher_seconds"] == 4.0
    assert rows["cutoff-10"]["speed_up"] == pytest.approx(4.0)
    assert rows["cutoff-20"]["speed_up"] == pytest.approx(2.0)
    assert rows["teacher"]["speed_up"] == pytest.approx(1.0)
    assert rows["student"]["unparsed"] == 1 and rows["cutoff-20"]["unparsed"] == 0
    assert rows["cutoff-10"]["models"] == "big → small" and rows["student"]["models"] == "— → small"


def test_report_files_show_the_same_numbers(tmp_path: Path) -> None:
    summary = summarize(plan=_plan(), records=_hand_written_records(), dataset={"file": "x"})
    written = write_report(summary, tmp_path)
    assert sorted(p.name for p in written) == ["accuracy.png", "summary.json", "table.md", "time.png"]
    for png in ("accuracy.png", "time.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == summary["rows"]
    table = markdown_table(summary)
    assert "| GKT cutoff | big → small | 10 | 10.0 | 20.0 | 25.0 | 50.0 | +25.0 | 1 | 8.0 | 4.00× |" in table
    assert "| Student alone | — → small | — |" in table and "GSM8K (4 examples: 0-3)" in table
