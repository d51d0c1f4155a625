"""`gkt eval` offline on the tiny models: real generation, the report's arithmetic, and resuming a run."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from gkt.answers import extract_answer, is_correct
from gkt.evaluation.archive import render
from gkt.jobs import Task
from gkt_tools.cli import main
from tests.unit.test_evaluation import GSM8K_LINES, write_data_dir


def _eval(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *argv])
    return int(exit_info.value.code or 0)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


@pytest.fixture
def run_args(tiny_models: tuple[Path, Path], tmp_path: Path) -> list[str]:
    teacher, student = tiny_models
    data = write_data_dir(tmp_path / "data", Task.GSM8K, GSM8K_LINES)
    return [
        "offline", "--dataset", "gsm8k", "--data-dir", str(data), "--models", f"{teacher},{student}",
        "--guidance-tokens", "3,6", "--student-tokens", "8", "--batch-size", "2", "--no-progress",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip


def test_offline_run_reports_table_two_from_its_records(run_args: list[str], tmp_path: Path) -> None:
    assert _eval(*run_args, "--limit", "3") == 0
    out = tmp_path / "out"
    records = _records(out)
    assert sorted((r["condition"], r["index"]) for r in records) == sorted(
        (c, i) for c in ("student", "teacher", "cutoff-3", "cutoff-6") for i in range(3)
    )
    for r in records:
        assert r["gold"] == ["7", "2400", "-7"][r["index"]]
        assert r["seconds"] == pytest.approx(r["teacher_seconds"] + r["student_seconds"])
        if r["condition"] == "student":
            assert r["guidance"] == "" and r["teacher_seconds"] == 0 and r["teacher_answer"] is None
        if r["condition"] == "teacher":
            assert r["student_text"] == "" and r["student_seconds"] == 0 and r["guidance_tokens"] <= 100
        if r["condition"].startswith("cutoff-"):
            assert 1 <= r["guidance_tokens"] <= int(r["condition"].split("-")[1])
            assert r["student_tokens"] <= 8 and r["teacher_batch_size"] in (1, 2)
        # ACC_teacher scores the guidance alone; ACC scores guidance + continuation
        assert r["teacher_answer"] == (
            None if r["condition"] == "student" else extract_answer(task=Task.GSM8K, text=r["guidance"])
        )
        assert r["answer"] == extract_answer(task=Task.GSM8K, text=r["guidance"] + r["student_text"])
        assert r["correct"] == is_correct(task=Task.GSM8K, predicted=r["answer"], gold=r["gold"])
    # The two examples of a teacher batch share its time equally.
    first_batch = [r["teacher_seconds"] for r in records if r["condition"] == "cutoff-3" and r["index"] < 2]
    assert first_batch[0] == first_batch[1] > 0

    summary = json.loads((out / "summary.json").read_text())
    rows = {row["name"]: row for row in summary["rows"]}
    assert summary["examples"] == 3 and summary["example_indices"] == "0-2"
    teacher_time = sum(r["seconds"] for r in records if r["condition"] == "teacher")
    student_acc = sum(r["correct"] for r in records if r["condition"] == "student") / 3
    for name, row in rows.items():
        mine = [r for r in records if r["condition"] == name]
        total = sum(r["seconds"] for r in mine)
        assert row["total_seconds"] == pytest.approx(total)
        assert row["teacher_seconds"] == pytest.approx(sum(r["teacher_seconds"] for r in mine))
        assert row["speed_up"] == pytest.approx(teacher_time / total)
        assert row["acc"] == pytest.approx(sum(r["correct"] for r in mine) / 3)
        assert row["delta_acc"] == pytest.approx(row["acc"] - student_acc)
        assert row["unparsed"] == sum(r["answer"] is None for r in mine)
        if name != "student":
            assert row["acc_teacher"] == pytest.approx(sum(r["teacher_correct"] for r in mine) / 3)
    assert {"table.md", "accuracy.png", "time.png", "plan.json"} <= {p.name for p in out.iterdir()}
    assert "| GKT cutoff |" in (out / "table.md").read_text()


def test_students_decoded_together_give_the_answers_they_give_one_at_a_time(
    run_args: list[str], tmp_path: Path
) -> None:
    assert _eval(*run_args, "--limit", "4") == 0
    batched_out = tmp_path / "batched"
    batched_args = [*run_args[:-1], str(batched_out), "--student-batch-size", "2"]
    assert _eval(*batched_args, "--limit", "4") == 0

    answers = ("condition", "index", "guidance", "student_text", "student_tokens", "answer", "correct")
    alone = [{k: r[k] for k in answers} for r in _records(tmp_path / "out")]
    assert [{k: r[k] for k in answers} for r in _records(batched_out)] == alone
    # sampled, not greedy, and with continuations of several lengths: batch-mates really differ
    assert len({r["student_text"] for r in alone if r["condition"] == "student"}) > 1
    # a batch's students share its time; the plan and the report's heading say how they ran
    student_rows = [r for r in _records(batched_out) if r["condition"] == "student"]
    assert student_rows[0]["student_seconds"] == student_rows[1]["student_seconds"] > 0
    assert json.loads((batched_out / "summary.json").read_text())["plan"]["student_batch_size"] == 2
    assert "students at batch 2" in (batched_out / "table.md").read_text()
    # each record says how its student ran, so a kept run's report says it too
    assert {r["condition"]: r["student_batch_size"] for r in _records(batched_out)} == {
        "student": 2,
        "teacher": 0,
        "cutoff-3": 2,
        "cutoff-6": 2,
    }
    assert {r["student_batch_size"] for r in _records(tmp_path / "out") if r["condition"] != "teacher"} == {1}
    (batched_out / "records.jsonl.gz").write_bytes(
        gzip.compress((batched_out / "records.jsonl").read_bytes())
    )
    (batched_out / "records.jsonl").unlink()
    assert "students at batch 2" in render(tmp_path)


def test_rerun_skips_finished_examples_and_extends_the_limit(run_args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _eval(*run_args, "--limit", "2") == 0
    first = (out / "records.jsonl").read_text()

    assert _eval(*run_args, "--limit", "2") == 0
    assert (out / "records.jsonl").read_text() == first

    assert _eval(*run_args, "--limit", "3") == 0
    extended = (out / "records.jsonl").read_text()
    assert extended.startswith(first)
    added = [json.loads(line) for line in extended[len(first) :].splitlines()]
    assert sorted((r["condition"], r["index"]) for r in added) == sorted(
        (c, 2) for c in ("student", "teacher", "cutoff-3", "cutoff-6")
    )
    assert json.loads((out / "summary.json").read_text())["examples"] == 3

    (out / "summary.json").unlink()
    assert _eval(*run_args, "--limit", "4", "--report-only") == 0
    assert (out / "records.jsonl").read_text() == extended
    assert json.loads((out / "summary.json").read_text())["examples"] == 3


def test_rerun_with_other_settings_is_refused(
    run_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _eval(*run_args, "--limit", "1", "--no-baselines") == 0
    assert _eval(*run_args, "--limit", "1", "--seed", "9") == 2
    assert "seed: 0 there, 9 now" in capsys.readouterr().err


def test_missing_data_is_a_clear_error(
    run_args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert _eval(*run_args, "--data-dir", str(tmp_path / "empty")) == 2
    error = capsys.readouterr().err
    assert "gsm8k_test.jsonl" in error and "openai/grade-school-math" in error


def test_oracle_rows_cut_the_reference_solution_and_never_run_the_teacher(
    run_args: list[str], tmp_path: Path
) -> None:
    argv = [a for a in run_args if a != "3,6"]
    argv[argv.index("--guidance-tokens") + 1 :] = ["3,100", *argv[argv.index("--guidance-tokens") + 1 :]]
    assert _eval(*argv, "--limit", "2", "--guidance", "oracle", "--baselines", "student") == 0
    records = {(r["condition"], r["index"]): r for r in _records(tmp_path / "out")}
    assert sorted(records) == sorted((c, i) for c in ("student", "oracle-3", "oracle-100") for i in range(2))
    whole = records[("oracle-100", 0)]
    assert whole["guidance"] == "3+4=7 The answer is 7." and whole["teacher_answer"] == "7"
    assert whole["teacher_correct"] and whole["correct"]
    for (condition, index), r in records.items():
        if condition.startswith("oracle-"):
            reference = records[("oracle-100", index)]["guidance"]
            assert reference.startswith(r["guidance"]) and r["guidance_tokens"] <= int(
                condition.split("-")[1]
            )
            assert r["teacher_seconds"] == 0 and r["teacher_batch_size"] == 0 and r["student_tokens"] >= 1
    assert records[("oracle-3", 0)]["guidance"] != whole["guidance"]
