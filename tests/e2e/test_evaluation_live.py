"""`gkt eval live`: every question through the real gateway, teacher and Celery students over gRPC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gkt.answers import extract_answer
from gkt.jobs import Task
from gkt_tools.cli import main
from gkt_tools.stack import Stack
from tests.unit.test_evaluation import CSQA_LINES, write_data_dir


def test_live_run_times_the_real_system(tiny_stack: Stack, tmp_path: Path) -> None:
    data = write_data_dir(tmp_path / "data", Task.CSQA, CSQA_LINES)
    out = tmp_path / "out"
    argv = [
        "eval", "live", "--addr", tiny_stack.gateway_addr or "", "--dataset", "csqa", "--data-dir", str(data),
        "--limit", "3", "--guidance-tokens", "4", "--student-tokens", "6", "--concurrency", "3",
        "--models", "tiny-teacher,tiny-student", "--timeout", "120", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0

    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted((r["condition"], r["index"]) for r in records) == sorted(
        (c, i) for c in ("student", "teacher", "cutoff-4") for i in range(3)
    )
    for r in records:
        assert r["latency_seconds"] > 0 and r["seconds"] > 0
        assert r["answer"] == extract_answer(task=Task.CSQA, text=r["guidance"] + r["student_text"])
        if r["condition"] == "cutoff-4":
            assert 1 <= r["guidance_tokens"] <= 4 and r["student_tokens"] <= 6
            assert r["teacher_seconds"] > 0 and r["student_seconds"] > 0
        if r["condition"] == "student":
            assert r["guidance"] == "" and r["teacher_seconds"] == 0
        if r["condition"] == "teacher":
            assert r["student_text"] == "" and r["student_seconds"] == 0
    # Three requests were in flight at once, so the teacher batched at least two of them.
    assert max(r["teacher_batch_size"] for r in records if r["condition"] == "cutoff-4") >= 2

    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan"]["runner"] == "live" and summary["plan"]["teacher_temperature"] is None
    rows = {row["name"]: row for row in summary["rows"]}
    assert rows["cutoff-4"]["speed_up"] == pytest.approx(
        rows["teacher"]["total_seconds"] / rows["cutoff-4"]["total_seconds"]
    )

    # A rerun asks the gateway nothing more.
    before = (out / "records.jsonl").read_text()
    with pytest.raises(SystemExit):
        main(argv)
    assert (out / "records.jsonl").read_text() == before


def test_failed_requests_are_reported_and_left_for_a_rerun(
    tiny_stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_data_dir(tmp_path / "data", Task.CSQA, CSQA_LINES)
    out = tmp_path / "out"
    argv = [
        "eval", "live", "--addr", tiny_stack.gateway_addr or "", "--dataset", "csqa", "--data-dir", str(data),
        "--limit", "2", "--no-baselines", "--guidance-tokens", "4", "--student-tokens", "6",
        "--timeout", "0.001", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "cutoff-4 example 0: DEADLINE_EXCEEDED" in capsys.readouterr().err
    assert not (out / "records.jsonl").exists()
    assert json.loads((out / "summary.json").read_text())["examples"] == 0
