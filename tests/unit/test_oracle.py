"""The oracle guidance (evaluation only): the reference solution, cut to N tokens, refused where there is none."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gkt.answers import extract_answer, gold_answer
from gkt.client import DEFAULT_GATEWAY_ADDR
from gkt.evaluation.datasets import load_dataset
from gkt.evaluation.oracle import OracleError, oracle_guidance, reference_solution
from gkt.evaluation.plan import Condition, EvalPlan
from gkt.evaluation.records import ExampleRecord
from gkt.evaluation.report import markdown_table, summarize
from gkt.jobs import GuidanceMode, Task
from gkt.models import EchoTokenizer
from gkt_tools.evaluation import add_arguments, build_plan
from tests.unit.test_evaluation import CSQA_LINES, write_data_dir

GSM8K_RECORD = {
    "question": "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. She sells the rest at $2. How much?",
    "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
    "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18",
}
AQUA_RECORD = {
    "question": "What is 2 + 3?",
    "options": ["A)4", "B)5", "C)6", "D)7", "E)8"],
    "rationale": "2 + 3 = 5.\nAnswer: B",
    "correct": "B",
}


def test_gsm8k_reference_drops_calculator_marks_and_ends_as_the_exemplars_do() -> None:
    reference = reference_solution(task=Task.GSM8K, record=GSM8K_RECORD)
    assert reference == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day. "
        "She makes 9 * 2 = $18 every day at the farmer's market. The answer is 18."
    )
    assert extract_answer(task=Task.GSM8K, text=reference or "") == gold_answer(
        task=Task.GSM8K, record=GSM8K_RECORD
    )


def test_aqua_reference_is_its_rationale_and_csqa_has_none() -> None:
    assert reference_solution(task=Task.AQUA, record=AQUA_RECORD) == "2 + 3 = 5.\nAnswer: B"
    assert reference_solution(task=Task.CSQA, record=CSQA_LINES[0]) is None


def test_guidance_is_the_first_n_tokens_decoded_and_stripped() -> None:
    # The echo tokenizer counts bytes: one token a byte.
    text, tokens = oracle_guidance(reference="Janet sells 16 eggs.", tokenizer=EchoTokenizer(), max_tokens=12)
    assert (text, tokens) == ("Janet sells", 12)
    whole, count = oracle_guidance(reference="short", tokenizer=EchoTokenizer(), max_tokens=40)
    assert (whole, count) == ("short", 5)
    with pytest.raises(OracleError, match="no reference"):
        oracle_guidance(reference=None, tokenizer=EchoTokenizer(), max_tokens=10)


def test_loaded_examples_carry_their_reference(tmp_path: Path) -> None:
    data = write_data_dir(tmp_path, Task.GSM8K, [GSM8K_RECORD])
    (example,) = load_dataset(task=Task.GSM8K, data_dir=data).examples
    assert example.reference is not None and "<<" not in example.reference
    assert example.reference.endswith("The answer is 18.")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, default_addr=DEFAULT_GATEWAY_ADDR)
    return parser.parse_args(list(argv))


def test_oracle_rows_follow_the_gkt_rows_beside_the_chosen_baselines() -> None:
    plan = build_plan(
        _args(
            "--dataset",
            "gsm8k",
            "--guidance",
            "cutoff,oracle",
            "--guidance-tokens",
            "10,20",
            "--baselines",
            "student",
        )
    )
    assert [c.name for c in plan.conditions()] == [
        "student",
        "cutoff-10",
        "cutoff-20",
        "oracle-10",
        "oracle-20",
    ]
    oracle = plan.conditions()[-1]
    assert oracle.guided and not oracle.uses_teacher and oracle.uses_student
    assert Condition.from_name("oracle-20", student_tokens=300) == oracle
    only = build_plan(_args("--dataset", "aqua", "--guidance", "oracle", "--no-baselines"))
    assert [c.name for c in only.conditions()] == ["oracle-20"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--dataset", "csqa", "--guidance", "oracle"), "csqa does not have"),
        (("live", "--dataset", "gsm8k", "--guidance", "oracle"), "offline evaluation only"),
        (("--guidance", "oracles"), "takes cutoff, concise, hint, oracle"),
        (("--baselines", "student,judge"), "--baselines takes student, teacher"),
    ],
)
def test_oracle_is_refused_where_it_cannot_run(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_plan(_args(*argv))


def test_oracle_row_is_named_as_such_in_the_table() -> None:
    plan = EvalPlan(
        task=Task.GSM8K, teacher="big", student="small", modes=(), oracle=True, max_guidance_tokens=(10,),
        student_tokens=300, baselines=(GuidanceMode.NONE,),
    )  # fmt: skip
    records = {}
    for i, (student_right, oracle_right, guidance_right) in enumerate(
        [(False, True, True), (True, True, False)]
    ):
        for name, correct, teacher_correct in (
            ("student", student_right, False),
            ("oracle-10", oracle_right, guidance_right),
        ):
            records[(name, i)] = ExampleRecord(
                condition=name, index=i, question="q", gold="1", seed=i, guidance="g", guidance_tokens=10,
                teacher_answer=None, teacher_correct=teacher_correct, student_text="s", student_tokens=20,
                answer="1", correct=correct, teacher_seconds=0.0, student_seconds=1.0, seconds=1.0,
            )  # fmt: skip
    summary = summarize(plan=plan, records=records, dataset={"file": "x"})
    oracle = summary["rows"][1]
    assert (oracle["acc"], oracle["acc_teacher"], oracle["delta_acc"]) == (1.0, 0.5, 0.5)
    assert oracle["speed_up"] is None and oracle["teacher_seconds"] == 0.0
    assert (
        "| Oracle guidance (evaluation only) | oracle (reference solution) → small | 10 |"
        in markdown_table(summary)
    )
