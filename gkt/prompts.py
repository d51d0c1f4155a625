"""Prompts: Manual-CoT few-shot exemplars and the teacher and student prompts built from them.

Exemplars are the chain-of-thought sets of Wei et al. 2022 (arXiv 2201.11903, appendix G) as the GKT
paper's scripts (github.com/Zoeyyao27/GKT, `utils_data.py`) use them: GSM8K 8-shot (the math word problem
set), CommonsenseQA 7-shot and AQuA 4-shot. Two published labels contradict their own rationales: the CSQA
fox exemplar reasons to "natural habitat" (C) but is labelled (B), and GKT's AQuA keystroke exemplar
computes 1392 (B) but is labelled (D). `ExemplarSet.PAPER` keeps both errors, to reproduce the paper's
prompts; `ExemplarSet.CORRECTED` (the default, served and evaluated) fixes the two labels and nothing else.
Both sets keep the published questions and rationales in one uniform layout. Every exemplar renders as

    Q: {question}
    A: {rationale} The answer is {answer}.

followed by a blank line. Multiple-choice questions carry their options on a second line,
`{stem}\\nAnswer Choices: (A) x (B) y ...`, and their answers are written `(B)`: an UPPERCASE letter
in parentheses, everywhere (choice labels, exemplar answers). Wei et al. write lowercase letters and GKT's
scripts put the choices on the question's line ("Answer choices: (A) x, (B) y.") with a bare letter after
"The answer is"; we use the dataset's own uppercase labels and one layout for all tasks so that
`gkt.answers` reads every answer the same way.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gkt.jobs import GuidanceMode, Task


class ExemplarSet(enum.StrEnum):
    """Which labels the few-shot exemplars carry: as published (with its two errors) or corrected."""

    CORRECTED = "corrected"
    PAPER = "paper"


STOP_SEQUENCE = "\nQ:"
"""Generation stops here: the model has finished its answer and started the next question."""

_MODE_PREFIXES: Mapping[GuidanceMode, str] = {
    GuidanceMode.CUTOFF: "",
    GuidanceMode.FULL: "",
    GuidanceMode.CONCISE: "Provide the answer in a brief manner: ",
    GuidanceMode.HINT: "Provide a brief hint for the question: ",
}


@dataclass(frozen=True, slots=True)
class Exemplar:
    """One worked example: a question, its chain of thought, and the answer as written in the prompt."""

    question: str
    rationale: str
    answer: str

    def render(self) -> str:
        return f"Q: {self.question}\nA: {self.rationale} The answer is {self.answer}.\n\n"


GSM8K_EXEMPLARS: tuple[Exemplar, ...] = (
    Exemplar(
        question="There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
        "After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
        rationale="There are 15 trees originally. Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6.",
        answer="6",
    ),
    Exemplar(
        question="If there are 3 cars in the parking lot and 2 more cars arrive, "
        "how many cars are in the parking lot?",
        rationale="There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.",
        answer="5",
    ),
    Exemplar(
        question="Leah had 32 chocolates and her sister had 42. If they ate 35, "
        "how many pieces do they have left in total?",
        rationale="Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
        "After eating 35, they had 74 - 35 = 39.",
        answer="39",
    ),
    Exemplar(
        question="Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. "
        "How many lollipops did Jason give to Denny?",
        rationale="Jason started with 20 lollipops. Then he had 12 after giving some to Denny. "
        "So he gave Denny 20 - 12 = 8.",
        answer="8",
    ),
    Exemplar(
        question="Shawn has five toys. For Christmas, he got two toys each from his mom and dad. "
        "How many toys does he have now?",
        rationale="Shawn started with 5 toys. If he got 2 toys each from his mom and dad, "
        "then that is 4 more toys. 5 + 4 = 9.",
        answer="9",
    ),
    Exemplar(
        question="There were nine computers in the server room. Five more computers were installed each day, "
        "from monday to thursday. How many computers are now in the server room?",
        rationale="There were originally 9 computers. For each of 4 days, 5 more computers were added. "
        "So 5 * 4 = 20 computers were added. 9 + 20 is 29.",
        answer="29",
    ),
    Exemplar(
        question="Michael had 58 golf balls. On tuesday, he lost 23 golf balls. "
        "On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
        rationale="Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. "
        "After losing 2 more, he had 35 - 2 = 33 golf balls.",
        answer="33",
    ),
    Exemplar(
        question="Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        rationale="Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. "
        "So she has 23 - 15 dollars left. 23 - 15 is 8.",
        answer="8",
    ),
)

CSQA_EXEMPLARS: tuple[Exemplar, ...] = (
    Exemplar(
        question="What do people use to absorb extra ink from a fountain pen?\nAnswer Choices: "
        "(A) shirt pocket (B) calligrapher's hand (C) inkwell (D) desk drawer (E) blotter",
        rationale="The answer must be an item that can absorb ink. "
        "Of the above choices, only blotters are used to absorb ink.",
        answer="(E)",
    ),
    Exemplar(
        question="What home entertainment equipment requires cable?\nAnswer Choices: "
        "(A) radio shack (B) substation (C) television (D) cabinet",
        rationale="The answer must require cable. Of the above choices, only television requires cable.",
        answer="(C)",
    ),
    # The rationale names "natural habitat", which is (C); the published label (B) is the error.
    Exemplar(
        question="The fox walked from the city into the forest, what was it looking for?\nAnswer Choices: "
        "(A) pretty flowers (B) hen house (C) natural habitat (D) storybook",
        rationale="The answer must be something in the forest. "
        "Of the above choices, only natural habitat is in the forest.",
        answer="(C)",
    ),
    Exemplar(
        question="Sammy wanted to go to where the people were. Where might he go?\nAnswer Choices: "
        "(A) populated areas (B) race track (C) desert (D) apartment (E) roadblock",
        rationale="The answer must be a place with a lot of people. "
        "Of the above choices, only populated areas have a lot of people.",
        answer="(A)",
    ),
    Exemplar(
        question="Where do you put your grapes just before checking out?\nAnswer Choices: "
        "(A) mouth (B) grocery cart (C) super market (D) fruit basket (E) fruit market",
        rationale="The answer should be the place where grocery items are placed before checking out. "
        "Of the above choices, grocery cart makes the most sense for holding grocery items.",
        answer="(B)",
    ),
    Exemplar(
        question="Google Maps and other highway and street GPS services have replaced what?\nAnswer Choices: "
        "(A) united states (B) mexico (C) countryside (D) atlas",
        rationale="The answer must be something that used to do what Google Maps and GPS services do, "
        "which is to give directions. Of the above choices, only atlases are used to give directions.",
        answer="(D)",
    ),
    Exemplar(
        question="Before getting a divorce, what did the wife feel who was doing all the work?\n"
        "Answer Choices: (A) harder (B) anguish (C) bitterness (D) tears (E) sadness",
        rationale="The answer should be the feeling of someone getting divorced who was doing all the work. "
        "Of the above choices, the closest feeling is bitterness.",
        answer="(C)",
    ),
)

AQUA_EXEMPLARS: tuple[Exemplar, ...] = (
    Exemplar(
        question="John found that the average of 15 numbers is 40. If 10 is added to each number "
        "then the mean of the numbers is?\nAnswer Choices: (A) 50 (B) 45 (C) 65 (D) 78 (E) 64",
        rationale="If 10 is added to each number, then the mean of the numbers also increases by 10. "
        "So the new mean would be 50.",
        answer="(A)",
    ),
    Exemplar(
        question="If a / b = 3/4 and 8a + 5b = 22,then find the value of a.\n"
        "Answer Choices: (A) 1/2 (B) 3/2 (C) 5/2 (D) 4/2 (E) 7/2",
        rationale="If a / b = 3/4, then b = 4a / 3. So 8a + 5(4a / 3) = 22. This simplifies to "
        "8a + 20a / 3 = 22, which means 44a / 3 = 22. So a is equal to 3/2.",
        answer="(B)",
    ),
    Exemplar(
        question="A person is traveling at 20 km/hr and reached his destiny in 2.5 hr "
        "then find the distance?\nAnswer Choices: (A) 53 km (B) 55 km (C) 52 km (D) 60 km (E) 50 km",
        rationale="The distance that the person traveled would have been 20 km/hr * 2.5 hrs = 50 km.",
        answer="(E)",
    ),
    Exemplar(
        question="How many keystrokes are needed to type the numbers from 1 to 500?\n"
        "Answer Choices: (A) 1156 (B) 1392 (C) 1480 (D) 1562 (E) 1788",
        rationale="There are 9 one-digit numbers from 1 to 9. There are 90 two-digit numbers from 10 to 99. "
        "There are 401 three-digit numbers from 100 to 500. 9 + 90(2) + 401(3) = 1392.",
        # 1392 is (B); GKT's published prompt labels this exemplar (D).
        answer="(B)",
    ),
)

PAPER_LABEL_ERRORS: Mapping[Task, Mapping[int, str]] = {
    Task.CSQA: {2: "(B)"},
    Task.AQUA: {3: "(D)"},
}
"""The published (wrong) label of each exemplar, by position, that the corrected set fixes."""

EXEMPLARS: Mapping[Task, tuple[Exemplar, ...]] = {
    Task.FREEFORM: (),
    Task.GSM8K: GSM8K_EXEMPLARS,
    Task.CSQA: CSQA_EXEMPLARS,
    Task.AQUA: AQUA_EXEMPLARS,
}
"""The corrected Manual-CoT exemplar set of each task (the default)."""


def exemplars(*, task: Task, exemplar_set: ExemplarSet = ExemplarSet.CORRECTED) -> tuple[Exemplar, ...]:
    """The few-shot exemplars of a task, with the published label errors when `exemplar_set` is PAPER."""
    corrected = EXEMPLARS[task]
    if exemplar_set is ExemplarSet.CORRECTED:
        return corrected
    errors = PAPER_LABEL_ERRORS.get(task, {})
    return tuple(
        Exemplar(question=e.question, rationale=e.rationale, answer=errors.get(i, e.answer))
        for i, e in enumerate(corrected)
    )


def format_choices(stem: str, choices: Sequence[tuple[str, str]]) -> str:
    """A multiple-choice question as `stem\\nAnswer Choices: (A) x (B) y ...`; labels are upper-cased."""
    options = " ".join(f"({label.strip().upper()}) {text.strip()}" for label, text in choices)
    return f"{stem.strip()}\nAnswer Choices: {options}"


@functools.cache
def exemplar_block(*, task: Task, exemplar_set: ExemplarSet = ExemplarSet.CORRECTED) -> str:
    """The few-shot prefix of a task: identical for every job, so it is rendered once."""
    return "".join(exemplar.render() for exemplar in exemplars(task=task, exemplar_set=exemplar_set))


def task_prompt(*, task: Task, query: str, exemplar_set: ExemplarSet = ExemplarSet.CORRECTED) -> str:
    """The task's exemplars followed by `Q: {query}\\nA:`, ready for the model to answer."""
    # Surrounding whitespace (a user's trailing newline) would break the Q:/A: layout the exemplars teach.
    return f"{exemplar_block(task=task, exemplar_set=exemplar_set)}Q: {query.strip()}\nA:"


def teacher_prompt(
    *, task: Task, mode: GuidanceMode, query: str, exemplar_set: ExemplarSet = ExemplarSet.CORRECTED
) -> str:
    """What the teacher is asked for a job in `mode`; the `none` mode asks it nothing."""
    if mode not in _MODE_PREFIXES:
        raise ValueError(f"guidance mode {mode.value!r} makes no teacher call, so it has no teacher prompt")
    return _MODE_PREFIXES[mode] + task_prompt(task=task, query=query, exemplar_set=exemplar_set)


def student_prompt(
    *, task: Task, query: str, guidance: str, exemplar_set: ExemplarSet = ExemplarSet.CORRECTED
) -> str:
    """The task prompt with the teacher's guidance after `A: `, so the student continues the teacher."""
    prompt = task_prompt(task=task, query=query, exemplar_set=exemplar_set)
    return f"{prompt} {guidance}" if guidance else prompt
