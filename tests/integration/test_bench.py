"""`gkt bench` on the echo backends (a tiny sweep), the echo backends themselves, and the report's arithmetic.

Timings are never asserted: only the report's structure and the arithmetic that ties its numbers together.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from gkt.decoding import encode
from gkt.engine import Engine, EngineRequest
from gkt.evaluation.datasets import SUMS_FILE
from gkt.jobs import GuidanceMode, Task
from gkt.models import ECHO_MODEL, load_model
from gkt.prompts import STOP_SEQUENCE, student_prompt, teacher_prompt
from gkt_tools.bench import command as bench
from gkt_tools.bench.stats import Sample, percentile, summarize
from gkt_tools.settings import ToolSettings
from services.teacher.backends.base import GenerationRequest
from services.teacher.backends.echo import EchoBackend
from tests.unit.test_evaluation import CSQA_LINES, GSM8K_LINES, write_data_dir
from tests.unit.test_oracle import AQUA_RECORD


def test_percentiles_interpolate_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile(values, 90) == pytest.approx(3.7)
    assert math.isnan(percentile([], 50))


def test_a_summary_counts_failures_apart_and_derives_throughput_from_successes() -> None:
    samples = [
        Sample(latency_s=0.010, ttft_s=0.002, stages_ms={"teacher_ms": 1.0}, batch_size=2, tokens=3),
        Sample(latency_s=0.030, ttft_s=0.004, stages_ms={"teacher_ms": 3.0}, batch_size=2, tokens=5),
        Sample(latency_s=0.020, stages_ms={"teacher_ms": 2.0}, batch_size=1, tokens=1),
        Sample(latency_s=9.0, ok=False, error="UNAVAILABLE"),
    ]
    summary = summarize(samples, wall_s=0.5, concurrency=2)
    assert (summary["requests"], summary["ok"], summary["errors"]) == (4, 3, {"UNAVAILABLE": 1})
    assert summary["throughput_rps"] == pytest.approx(6.0)
    assert summary["latency_ms"]["p50"] == pytest.approx(20.0)
    assert summary["ttft_ms"]["p50"] == pytest.approx(3.0)
    assert summary["stage_mean_ms"] == {"teacher_ms": pytest.approx(2.0)}
    assert summary["batch_sizes"] == {"1": 1, "2": 2}
    assert summary["mean_batch_size"] == pytest.approx(5 / 3)
    assert summary["tokens"] == 9


async def test_the_echo_teacher_returns_the_first_words_of_the_question_at_once() -> None:
    backend = EchoBackend()
    prompt = teacher_prompt(
        task=Task.CSQA, mode=GuidanceMode.CUTOFF, query="Where is the plate?\n(A) x (B) y"
    )
    short = GenerationRequest(prompt=prompt, max_guidance_tokens=2, stop=(STOP_SEQUENCE,))
    long = GenerationRequest(prompt=prompt, max_guidance_tokens=50)

    first, second = await backend.generate_batch([short, long])

    assert (first.text, first.token_count, first.finish_reason) == ("Where is", 2, "length")  # type: ignore[union-attr]
    assert (second.text, second.finish_reason) == ("Where is the plate?", "eos")  # type: ignore[union-attr]


def test_the_echo_student_repeats_its_question_and_never_writes_a_stop_string(tmp_path: Path) -> None:
    lm = load_model(name=ECHO_MODEL, cache_dir=tmp_path)
    prompt = student_prompt(task=Task.GSM8K, query="How many?\nQ: not this line", guidance="Some")
    request = EngineRequest(
        prompt_ids=encode(lm, prompt),
        max_new_tokens=len("not this line") * 3,
        stop=(STOP_SEQUENCE,),
        prompt=prompt,
    )
    (result,) = Engine(lm).generate([request])
    assert result.text == "not this line" * 3
    assert result.finish_reason == "length"
    assert lm.eos_token_ids == frozenset()


def test_bench_sweeps_the_echo_stack_beside_both_floors_and_writes_a_consistent_report(
    tmp_path: Path,
) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        ["--scenarios", "overhead", "--concurrency", "1,3", "--requests", "12", "--echo-students", "1",
         "--out", str(tmp_path)]
    )  # fmt: skip

    assert bench.run(args, settings=ToolSettings()) == 0

    results = json.loads((tmp_path / "results.json").read_text())
    sweep = results["overhead"]["sweep"]
    assert set(sweep) == {"gkt", "redis_floor", "celery_floor"}
    for system, runs in sweep.items():
        assert [r["concurrency"] for r in runs] == [1, 3]
        for run in runs:
            assert (run["requests"], run["ok"], run["errors"]) == (12, 12, {})
            assert run["throughput_rps"] == pytest.approx(run["ok"] / run["wall_s"])
            latency = run["latency_ms"]
            assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
        assert results["overhead"]["saturation_rps"][system] == max(r["throughput_rps"] for r in runs)
        assert results["overhead"]["unloaded"][f"{system}_p50_ms"] == runs[0]["latency_ms"]["p50"]
    for run in sweep["gkt"]:
        assert sum(run["batch_sizes"].values()) == 12
        assert set(run["stage_mean_ms"]) == {
            "queue_wait_ms",
            "teacher_ms",
            "student_wait_ms",
            "student_ms",
            "total_ms",
        }
        assert run["ttft_ms"]["p50"] <= run["latency_ms"]["p99"]
        assert run["tokens"] == 12 * 16  # the echo student always writes max_new_tokens
    table = (tmp_path / "results.md").read_text()
    assert "| GKT, echo models | 3 |" in table
    assert "| bare Celery task | 1 |" in table
    for plot in ("overhead_latency.png", "overhead_throughput.png", "batch_sizes.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG")


def test_teacher_pipeline_scenario_measures_every_teacher_at_one_server_and_reports_the_ratios(
    tmp_path: Path,
) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        ["--scenarios", "teacher-pipeline", "--server-rows", "4", "--server-step-ms", "5",
         "--pipeline-requests", "24", "--pipeline-rounds", "2", "--out", str(tmp_path)]
    )  # fmt: skip

    assert bench.run(args, settings=ToolSettings()) == 0

    result = json.loads((tmp_path / "results.json").read_text())["teacher_pipeline"]
    assert result["server"] == {"rows": 4, "step_ms": 5, "median_tokens": 20, "sigma": 0.6}
    runs = result["runs"]
    assert set(runs) == {"batched", "pipelined", "pipelined-2m"}
    for run in runs.values():
        assert (run["requests"], run["ok"], run["errors"]) == (24, 24, {})
        assert 0 < run["mean_rows_per_step"] <= 4 and 0 < run["server_row_utilization"] <= 1
    # a batch of 4 is one teacher batch; pipelined jobs were admitted beside up to 3 others
    assert max(int(size) for size in runs["batched"]["batch_sizes"]) <= 4
    assert max(int(size) for size in runs["pipelined"]["batch_sizes"]) <= 4
    assert max(int(size) for size in runs["pipelined-2m"]["batch_sizes"]) <= 8
    for mode in ("pipelined", "pipelined-2m"):
        assert result["vs_batched"][mode]["throughput"] == pytest.approx(
            runs[mode]["throughput_rps"] / runs["batched"]["throughput_rps"]
        )
    assert "## Teacher pipelining" in (tmp_path / "results.md").read_text()


@pytest.mark.real_models
def test_teacher_pipeline_can_replay_the_guidance_lengths_the_bundled_teacher_writes(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    data = tmp_path / "data"
    sums = ""
    for task, lines in (
        (Task.AQUA, [AQUA_RECORD, AQUA_RECORD]),
        (Task.CSQA, CSQA_LINES),
        (Task.GSM8K, GSM8K_LINES),
    ):
        sums += (write_data_dir(data, task, lines) / SUMS_FILE).read_text()
    (data / SUMS_FILE).write_text(sums)
    args = parser.parse_args(
        ["--data-dir", str(data),
         "--scenarios", "teacher-pipeline", "--guidance-lengths", "bundled", "--length-questions", "2",
         "--server-rows", "4", "--server-step-ms", "5", "--pipeline-requests", "12", "--pipeline-rounds", "1",
         "--out", str(tmp_path)]
    )  # fmt: skip

    assert bench.run(args, settings=ToolSettings()) == 0

    result = json.loads((tmp_path / "results.json").read_text())["teacher_pipeline"]
    tasks = result["measured_lengths"]["tasks"]
    assert {name: task["max_guidance_tokens"] for name, task in tasks.items()} == {
        "aqua": 20,
        "csqa": 30,
        "gsm8k": 40,
    }
    for task in tasks.values():
        assert len(task["lengths"]) == 2
        assert all(1 <= n <= task["max_guidance_tokens"] for n in task["lengths"])
    assert result["full_rows_vs_one_batch_ceiling"] >= 1.0
    assert all(run["ok"] == 12 for run in result["runs"].values())
    assert "the bundled teacher's" in (tmp_path / "results.md").read_text()
