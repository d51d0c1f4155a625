"""Answers: extraction from generated text, gold answers of dataset records, and scoring."""

from __future__ import annotations

import pytest

from gkt.answers import extract_answer, format_record, gold_answer, is_correct
from gkt.jobs import Task

GSM8K_RECORD = {
    "question": "A shop sells 1,200 pens a day at $2 each. How much does it take in a day?",
    "answer": "It sells 1200 * 2 = <<1200*2=2400>>2400 dollars.\n#### 2,400",
}
CSQA_RECORD = {
    "answerKey": "B",
    "id": "hand-written",
    "question": {
        "question_concept": "fish",
        "choices": [
            {"label": "A", "text": "desert"},
            {"label": "B", "text": "river"},
            {"label": "C", "text": "sky"},
            {"label": "D", "text": "oven"},
            {"label": "E", "text": "attic"},
        ],
        "stem": "Where is a fish likely to live?",
    },
}
AQUA_RECORD = {
    "question": "What is 12 divided by 4?",
    "options": ["A)2", "B)3", "C) 4", "D)6", "E)None of these"],
    "rationale": "12 / 4 = 3\nAnswer : B",
    "correct": "B",
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So 20 - 12 = 8. The answer is 8.", "8"),
        ("The answer is 1,234.", "1234"),
        ("The answer is 1,450,000 dollars.", "1450000"),
        ("The temperature fell by 7. The answer is -7.", "-7"),
        ("The answer is 3.50.", "3.5"),
        ("The answer is 5.0", "5"),
        ("The answer is $18.", "18"),
        ("The answer is $1,234.50 in total.", "1234.5"),
        ("The answer is -$4.", "-4"),
        ("the answer is: 42", "42"),
        ("THE ANSWER IS 100.", "100"),
        ("The answer is 0.", "0"),
        ("The answer is 6. Then 7 more... The answer is 13.", "6"),
        ("She keeps 9 eggs. The answer is nine, that is 9 eggs.", "9"),
        ("The answer is \u22127.", "-7"),
        ("The answer is -0.25.", "-0.25"),
        ("The answer is .5 of a pie.", "0.5"),
        ("The answer is **12,000**.", "12000"),
        ("The answer is 8, because 5 + 3 = 8.", "8"),
        ("The answer is 10,000.50 dollars.", "10000.5"),
    ],
)
def test_gsm8k_reads_the_first_number_after_the_trigger(text: str, expected: str) -> None:
    assert extract_answer(task=Task.GSM8K, text=text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Janet sells 9 eggs for $2 each, making 18 dollars.",
        "The answer is unknown.",
        "The answer is not given here.\nBut 12 apples remain.",
        "",
    ],
)
def test_gsm8k_without_a_readable_answer_is_none(text: str) -> None:
    assert extract_answer(task=Task.GSM8K, text=text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Only blotters absorb ink. The answer is (E).", "E"),
        ("The answer is (b).", "B"),
        ("The answer is B", "B"),
        ("The answer is b.", "B"),
        ("The answer is b) calligrapher's hand.", "B"),
        ("The answer is (B) shirt pocket.", "B"),
        ("the answer is: (c)", "C"),
        ("The answer is option D.", "D"),
        ("The answer is grocery cart (b).", "B"),
        ("The answer is (A). Later text says the answer is (C).", "A"),
        ("The answer is E.", "E"),
        ("The answer is: **(d)**", "D"),
        ("the answer is c", "C"),
    ],
)
def test_choice_letter_is_read_in_either_case(text: str, expected: str) -> None:
    assert extract_answer(task=Task.CSQA, text=text) == expected
    assert extract_answer(task=Task.AQUA, text=text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "The answer is a good one.",
        "The answer is bitterness.",
        "The answer is (F).",
        "Of the above choices, only (c) fits.",
        "The answer is hard to say.\n(D) looks plausible.",
    ],
)
def test_choice_without_a_standalone_letter_after_the_trigger_is_none(text: str) -> None:
    assert extract_answer(task=Task.CSQA, text=text) is None


def test_freeform_has_no_answer_to_extract() -> None:
    assert extract_answer(task=Task.FREEFORM, text="The answer is 42.") is None


def test_gold_answers_of_hand_written_records() -> None:
    assert gold_answer(task=Task.GSM8K, record=GSM8K_RECORD) == "2400"
    assert gold_answer(task=Task.CSQA, record=CSQA_RECORD) == "B"
    assert gold_answer(task=Task.AQUA, record=AQUA_RECORD) == "B"


def test_gsm8k_gold_answer_may_be_negative_or_decimal() -> None:
    assert gold_answer(task=Task.GSM8K, record={"answer": "Loss.\n#### -12"}) == "-12"
    assert gold_answer(task=Task.GSM8K, record={"answer": "Cost.\n#### 2.50"}) == "2.5"


@pytest.mark.parametrize(
    ("task", "record"),
    [
        (Task.GSM8K, {"answer": "no final line"}),
        (Task.CSQA, {"answerKey": "Z"}),
        (Task.FREEFORM, {}),
    ],
)
def test_malformed_records_are_rejected(task: Task, record: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        gold_answer(task=task, record=record)


def test_extracted_answer_scores_against_gold() -> None:
    generated = "It sells 1,200 pens at $2, so $2,400. The answer is $2,400."
    predicted = extract_answer(task=Task.GSM8K, text=generated)
    assert is_correct(
        task=Task.GSM8K, predicted=predicted, gold=gold_answer(task=Task.GSM8K, record=GSM8K_RECORD)
    )


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("5", "5.0", True),
        ("5.0", "5", True),
        ("1234", "1,234", True),
        ("-3", "3", False),
        ("7", "8", False),
        (None, "8", False),
    ],
)
def test_gsm8k_correctness_compares_values(predicted: str | None, gold: str, expected: bool) -> None:
    assert is_correct(task=Task.GSM8K, predicted=predicted, gold=gold) is expected


def test_choice_correctness_compares_letters() -> None:
    assert is_correct(task=Task.CSQA, predicted="B", gold="B")
    assert is_correct(task=Task.AQUA, predicted="b", gold="B")
    assert not is_correct(task=Task.CSQA, predicted="A", gold="B")
    assert not is_correct(task=Task.AQUA, predicted=None, gold="B")


def test_format_record_builds_each_tasks_query() -> None:
    assert format_record(task=Task.GSM8K, record=GSM8K_RECORD) == GSM8K_RECORD["question"]
    assert format_record(task=Task.CSQA, record=CSQA_RECORD) == (
        "Where is a fish likely to live?\nAnswer Choices: (A) desert (B) river (C) sky (D) oven (E) attic"
    )
    assert format_record(task=Task.AQUA, record=AQUA_RECORD) == (
        "What is 12 divided by 4?\nAnswer Choices: (A) 2 (B) 3 (C) 4 (D) 6 (E) None of these"
    )


def test_only_generated_text_is_read_not_the_prompts_exemplars() -> None:
    """The first trigger decides: a later correct-looking answer does not rescue a wrong first one."""
    generated = "Leaves fall. The answer is (B). Q: ... The answer is (C)."
    assert extract_answer(task=Task.CSQA, text=generated) == "B"
    assert extract_answer(task=Task.GSM8K, text="So 3 + 4 = 7.\nThe answer is 7.\n\nThe answer is 8.") == "7"
