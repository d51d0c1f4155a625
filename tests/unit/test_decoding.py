"""Text tracking and the shared few-shot prefixes, on tiny random models (no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gkt.decoding import TextTracker, few_shot_prefixes
from gkt.jobs import GuidanceMode, Task
from gkt.models import LoadedModel, load_model
from gkt.prompts import exemplar_block, teacher_prompt


@pytest.fixture(scope="module")
def lm(tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(name=str(tiny_models[1]), cache_dir=tmp_path_factory.mktemp("cache"))


def _tokens(lm: LoadedModel, text: str) -> list[int]:
    ids: list[int] = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def test_tracker_cuts_at_the_first_stop_string_and_never_streams_part_of_it(lm: LoadedModel) -> None:
    tracker = TextTracker(lm=lm, stop=("\nQ:",))
    streamed = "".join(tracker.push(t) for t in _tokens(lm, "The answer is 6.\nQ: next question"))
    assert tracker.stopped
    assert tracker.text == "The answer is 6."
    assert streamed == tracker.text
    assert "\n" not in streamed


def test_tracker_holds_back_a_possible_stop_start_until_the_end(lm: LoadedModel) -> None:
    tracker = TextTracker(lm=lm, stop=("\nQ:",))
    streamed = "".join(tracker.push(t) for t in _tokens(lm, "six\n"))
    assert streamed == "six"
    assert tracker.flush() == "\n"
    assert not tracker.stopped
    assert tracker.token_count == len(tracker.tokens)


def test_tracker_keeps_the_leading_space_of_a_continuation(lm: LoadedModel) -> None:
    prompt_tokens = _tokens(lm, "A: The answer")
    tracker = TextTracker(lm=lm, stop=(), context=prompt_tokens[-2:])
    for token in _tokens(lm, " is 6"):
        tracker.push(token)
    assert tracker.text == " is 6"


def test_token_count_after_a_stop_counts_only_tokens_that_reached_the_text(lm: LoadedModel) -> None:
    tracker = TextTracker(lm=lm, stop=("STOP",))
    kept_tokens = _tokens(lm, "one two")
    for token in kept_tokens + _tokens(lm, " STOP more words"):
        tracker.push(token)
        if tracker.stopped:
            break
    assert tracker.text == "one two "
    assert len(kept_tokens) <= tracker.token_count <= len(kept_tokens) + 1


def test_every_few_shot_prompt_starts_with_one_of_the_shared_prefixes() -> None:
    prefixes = few_shot_prefixes()
    for task in (Task.GSM8K, Task.CSQA, Task.AQUA):
        for mode in (GuidanceMode.CUTOFF, GuidanceMode.HINT):
            prompt = teacher_prompt(task=task, mode=mode, query="Q: What?\nA: trick")
            longest = max((p for p in prefixes if prompt.startswith(p)), key=len)
            assert longest == prompt[: prompt.index("Q: Q: What?")]
    assert few_shot_prefixes(modes=[GuidanceMode.CUTOFF]) == [
        exemplar_block(task=t) for t in Task if t != Task.FREEFORM
    ]
