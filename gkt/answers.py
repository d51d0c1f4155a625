"""Answers: reading the final answer out of generated text, and the gold answer out of a dataset record.

A generated answer counts only when it follows the first "The answer is" (the phrase every exemplar in
`gkt.prompts` ends with) of the generated text; callers pass only what the models wrote (guidance and
continuation), never the prompt, whose exemplars hold answers of their own. For GSM8K the answer is the
first number on the trigger's line. There is no fallback: text without a readable answer yields None, which
`is_correct` scores as wrong, where the paper's scripts would have guessed at random.
Numbers are normalised ("1,234" -> "1234", "3.50" -> "3.5", "5.0" -> "5"); choices are upper-case letters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from gkt.jobs import Task
from gkt.prompts import format_choices

_TRIGGER = re.compile(r"the answer is", re.IGNORECASE)
# Colons, markdown emphasis and quotes that models put between the trigger and the answer itself.
_LEAD_CHARS = " \t\n:*\"'`"
# A minus may be ASCII or U+2212, before or after a dollar sign; commas group thousands.
_NUMBER = re.compile(
    r"(?P<sign>[-\u2212])?\$?(?P<sign_after_dollar>[-\u2212])?(?P<digits>\d(?:[\d,]*\d)?(?:\.\d+)?|\.\d+)"
)
# A choice letter right after the trigger must stand alone: "(b)", "b)", "B", "B." or a final "b." all do,
# but the article in "The answer is a good one" does not, so a bare lower-case letter needs punctuation.
_LEADING_CHOICE = re.compile(
    r"(?:(?i:option|choice)[\s:]*)?"
    r"(?:\((?P<paren>[A-Ea-e])\)|(?P<closed>[A-Ea-e])\)|(?P<upper>[A-E])(?![A-Za-z0-9])"
    r"|(?P<lower>[a-e])(?=[.,;!?*\"']|\s*$))"
)
# "The answer is grocery cart (b)." names the option before its letter; only a parenthesised letter on the
# same line is taken then, since a bare one could be any word.
_LATER_CHOICE = re.compile(r"\((?P<letter>[A-Ea-e])\)")
_CHOICE_TASKS = (Task.CSQA, Task.AQUA)


def extract_answer(*, task: Task, text: str) -> str | None:
    """The normalised answer after the first "The answer is" in `text`, or None when there is none."""
    if task is Task.FREEFORM:
        return None
    trigger = _TRIGGER.search(text)
    if trigger is None:
        return None
    rest = text[trigger.end() :].lstrip(_LEAD_CHARS)
    if task is Task.GSM8K:
        # Only the trigger's own line: a number further down belongs to other reasoning, not to this answer.
        number = _NUMBER.search(rest.split("\n", 1)[0])
        return _normalise_number(number) if number else None
    return _choice_letter(rest)


def gold_answer(*, task: Task, record: Mapping[str, Any]) -> str:
    """The gold answer of a dataset record, normalised like `extract_answer`."""
    match task:
        case Task.GSM8K:
            _, separator, final = str(record["answer"]).rpartition("####")
            number = _NUMBER.search(final) if separator else None
            if number is None:
                raise ValueError(f"GSM8K answer does not end in '#### <number>': {record['answer']!r}")
            return _normalise_number(number)
        case Task.CSQA:
            return _gold_letter(record["answerKey"])
        case Task.AQUA:
            return _gold_letter(record["correct"])
    raise ValueError(f"task {task.value!r} has no gold answers")


def is_correct(*, task: Task, predicted: str | None, gold: str) -> bool:
    """Whether a prediction matches the gold answer; numbers compare by value, None is always wrong."""
    if predicted is None:
        return False
    if task is Task.GSM8K:
        try:
            return Decimal(predicted.replace(",", "")) == Decimal(gold.replace(",", ""))
        except InvalidOperation:
            return False
    if task in _CHOICE_TASKS:
        return predicted.strip().upper() == gold.strip().upper()
    raise ValueError(f"task {task.value!r} has no gold answers to compare with")


def format_record(*, task: Task, record: Mapping[str, Any]) -> str:
    """The query text of a dataset record, with its answer choices for multiple-choice tasks."""
    match task:
        case Task.GSM8K:
            return str(record["question"])
        case Task.CSQA:
            question = record["question"]
            choices = [(choice["label"], choice["text"]) for choice in question["choices"]]
            return format_choices(question["stem"], choices)
        case Task.AQUA:
            return format_choices(record["question"], [_split_option(option) for option in record["options"]])
    raise ValueError(f"task {task.value!r} has no dataset records")


def _normalise_number(match: re.Match[str]) -> str:
    negative = bool(match["sign"] or match["sign_after_dollar"])
    value = Decimal(match["digits"].replace(",", ""))
    if value == 0:
        return "0"
    # normalize() drops trailing zeros ("3.50" -> "3.5") but writes 100 as 1E+2; "f" spells it out again.
    text = format(value.normalize(), "f")
    return f"-{text}" if negative else text


def _choice_letter(rest: str) -> str | None:
    leading = _LEADING_CHOICE.match(rest)
    if leading:
        letter = next(group for group in leading.groups() if group)
        return letter.upper()
    later = _LATER_CHOICE.search(rest.split("\n", 1)[0])
    return later["letter"].upper() if later else None


def _split_option(option: str) -> tuple[str, str]:
    # AQuA writes options as "A)125": the label is what comes before the first ")".
    label, separator, text = option.partition(")")
    if not separator:
        raise ValueError(f"AQuA option is not of the form 'A)text': {option!r}")
    return label, text


def _gold_letter(raw: object) -> str:
    letter = str(raw).strip().upper()
    if letter not in {"A", "B", "C", "D", "E"}:
        raise ValueError(f"gold choice is not a letter A-E: {raw!r}")
    return letter
