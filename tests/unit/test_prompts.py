"""Prompts: exemplar sets, the teacher prompt of each guidance mode, and the student's continuation."""

from __future__ import annotations

import re

import pytest

from gkt.answers import extract_answer
from gkt.jobs import GuidanceMode, Task
from gkt.prompts import (
    EXEMPLARS,
    PAPER_LABEL_ERRORS,
    STOP_SEQUENCE,
    ExemplarSet,
    exemplar_block,
    exemplars,
    format_choices,
    student_prompt,
    task_prompt,
    teacher_prompt,
)

QUERY = "Tom has 3 apples and buys 4 more. How many apples does he have?"
CHOICE_QUERY = (
    "Where is a fish likely to live?\nAnswer Choices: (A) desert (B) river (C) sky (D) oven (E) attic"
)


@pytest.mark.parametrize(
    ("task", "count"), [(Task.GSM8K, 8), (Task.CSQA, 7), (Task.AQUA, 4), (Task.FREEFORM, 0)]
)
def test_each_task_has_the_paper_exemplar_count(task: Task, count: int) -> None:
    assert len(EXEMPLARS[task]) == count
    assert exemplar_block(task=task).count("Q: ") == count


def test_exemplars_use_the_published_sets() -> None:
    assert EXEMPLARS[Task.GSM8K][0].question.startswith("There are 15 trees in the grove.")
    assert EXEMPLARS[Task.CSQA][0].question.startswith("What do people use to absorb extra ink")
    assert EXEMPLARS[Task.AQUA][0].question.startswith("John found that the average of 15 numbers is 40.")


def test_exemplars_render_in_the_cot_format() -> None:
    block = exemplar_block(task=Task.GSM8K)
    assert block.startswith("Q: There are 15 trees in the grove.")
    assert "\nA: There are 15 trees originally." in block
    assert block.endswith("23 - 15 is 8. The answer is 8.\n\n")


@pytest.mark.parametrize("task", [Task.CSQA, Task.AQUA])
def test_choice_exemplars_put_uppercase_options_on_their_own_line(task: Task) -> None:
    for exemplar in EXEMPLARS[task]:
        stem, options = exemplar.question.split("\nAnswer Choices: ")
        assert "(A) " in options and "(a)" not in options
        assert re.fullmatch(r"\([A-E]\)", exemplar.answer)
        assert "\n" not in stem


@pytest.mark.parametrize("task", [Task.GSM8K, Task.CSQA, Task.AQUA])
def test_every_exemplar_answer_is_readable_by_the_extractor(task: Task) -> None:
    for exemplar in EXEMPLARS[task]:
        assert extract_answer(task=task, text=exemplar.render()) == exemplar.answer.strip("()")


def test_format_choices_renders_dataset_labels_uppercase() -> None:
    text = format_choices("Where is a fish likely to live?", [("a", "desert"), ("B", " river ")])
    assert text == "Where is a fish likely to live?\nAnswer Choices: (A) desert (B) river"


def test_task_prompt_ends_with_the_query_and_an_open_answer() -> None:
    prompt = task_prompt(task=Task.GSM8K, query=QUERY + "\n")
    assert prompt.startswith(exemplar_block(task=Task.GSM8K))
    assert prompt.endswith(f"\n\nQ: {QUERY}\nA:")


def test_freeform_prompt_has_no_exemplars() -> None:
    assert task_prompt(task=Task.FREEFORM, query="What is GKT?") == "Q: What is GKT?\nA:"


def test_stop_sequence_is_the_next_question() -> None:
    assert STOP_SEQUENCE == "\nQ:"
    assert task_prompt(task=Task.GSM8K, query=QUERY).count(STOP_SEQUENCE) == 8


@pytest.mark.parametrize(
    ("mode", "prefix"),
    [
        (GuidanceMode.CUTOFF, ""),
        (GuidanceMode.FULL, ""),
        (GuidanceMode.CONCISE, "Provide the answer in a brief manner: "),
        (GuidanceMode.HINT, "Provide a brief hint for the question: "),
    ],
)
def test_teacher_prompt_prefixes_the_task_prompt_by_mode(mode: GuidanceMode, prefix: str) -> None:
    prompt = teacher_prompt(task=Task.CSQA, mode=mode, query=CHOICE_QUERY)
    assert prompt == prefix + task_prompt(task=Task.CSQA, query=CHOICE_QUERY)


def test_none_mode_has_no_teacher_prompt() -> None:
    with pytest.raises(ValueError, match="none"):
        teacher_prompt(task=Task.GSM8K, mode=GuidanceMode.NONE, query=QUERY)


def test_student_continues_the_teachers_text_after_a() -> None:
    guidance = "Tom starts with 3 apples. He buys"
    teacher = teacher_prompt(task=Task.GSM8K, mode=GuidanceMode.CUTOFF, query=QUERY)
    prompt = student_prompt(task=Task.GSM8K, query=QUERY, guidance=guidance)
    assert prompt.startswith(teacher)
    assert prompt.endswith("A: " + guidance)
    assert prompt == teacher + " " + guidance


def test_student_prompt_without_guidance_is_the_task_prompt() -> None:
    prompt = student_prompt(task=Task.AQUA, query=CHOICE_QUERY, guidance="")
    assert prompt == task_prompt(task=Task.AQUA, query=CHOICE_QUERY)
    assert prompt.endswith("\nA:")


def test_student_prompt_omits_the_hint_instruction() -> None:
    prompt = student_prompt(task=Task.CSQA, query=CHOICE_QUERY, guidance="Fish need water.")
    assert "Provide a brief hint" not in prompt


def test_paper_set_keeps_the_two_published_label_errors() -> None:
    paper_csqa = exemplars(task=Task.CSQA, exemplar_set=ExemplarSet.PAPER)
    paper_aqua = exemplars(task=Task.AQUA, exemplar_set=ExemplarSet.PAPER)
    assert "natural habitat" in paper_csqa[2].rationale and paper_csqa[2].answer == "(B)"
    assert "= 1392" in paper_aqua[3].rationale and paper_aqua[3].answer == "(D)"


def test_corrected_set_is_the_default_and_answers_as_its_rationales_reason() -> None:
    corrected_csqa = exemplars(task=Task.CSQA)
    corrected_aqua = exemplars(task=Task.AQUA)
    assert corrected_csqa == EXEMPLARS[Task.CSQA]
    assert corrected_csqa[2].answer == "(C)" and "(C) natural habitat" in corrected_csqa[2].question
    assert corrected_aqua[3].answer == "(B)" and "(B) 1392" in corrected_aqua[3].question


@pytest.mark.parametrize("task", [Task.GSM8K, Task.CSQA, Task.AQUA])
def test_paper_and_corrected_sets_differ_only_in_the_listed_labels(task: Task) -> None:
    paper = exemplars(task=task, exemplar_set=ExemplarSet.PAPER)
    corrected = exemplars(task=task, exemplar_set=ExemplarSet.CORRECTED)
    differing = {i for i, (p, c) in enumerate(zip(paper, corrected, strict=True)) if p != c}
    assert differing == set(PAPER_LABEL_ERRORS.get(task, {}))
    for p, c in zip(paper, corrected, strict=True):
        assert (p.question, p.rationale) == (c.question, c.rationale)


def test_prompts_follow_the_chosen_exemplar_set() -> None:
    paper = task_prompt(task=Task.CSQA, query=CHOICE_QUERY, exemplar_set=ExemplarSet.PAPER)
    corrected = task_prompt(task=Task.CSQA, query=CHOICE_QUERY)
    assert "only natural habitat is in the forest. The answer is (B)." in paper
    assert "only natural habitat is in the forest. The answer is (C)." in corrected
    student = student_prompt(
        task=Task.CSQA, query=CHOICE_QUERY, guidance="Fish", exemplar_set=ExemplarSet.PAPER
    )
    assert student == paper + " Fish"
    teacher = teacher_prompt(
        task=Task.CSQA, mode=GuidanceMode.HINT, query=CHOICE_QUERY, exemplar_set=ExemplarSet.PAPER
    )
    assert teacher == "Provide a brief hint for the question: " + paper
