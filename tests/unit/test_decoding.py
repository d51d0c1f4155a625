"""The decode loop and text tracking, on tiny random models (no sockets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gkt.decoding import Sampler, TextTracker, _left_padded, decode_steps, few_shot_prefixes
from gkt.jobs import GuidanceMode, Task
from gkt.models import LoadedModel, load_model
from gkt.prompts import exemplar_block, teacher_prompt


@pytest.fixture(scope="module")
def lm(tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(name=str(tiny_models[1]), cache_dir=tmp_path_factory.mktemp("cache"))


def _tokens(lm: LoadedModel, text: str) -> list[int]:
    ids: list[int] = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def _generate(lm: LoadedModel, prompts: list[str], samplers: list[Sampler], n: int) -> list[list[int]]:
    rows: list[list[int]] = [[] for _ in prompts]
    for step, tokens in enumerate(decode_steps(lm=lm, prompts=prompts, samplers=samplers)):
        for row, token in zip(rows, tokens, strict=True):
            row.append(token)
        if step + 1 == n:
            return rows
    raise AssertionError("unreachable")


def test_a_row_generates_the_same_tokens_alone_and_left_padded_in_a_batch(lm: LoadedModel) -> None:
    prompt = "Q: How many trees are in the grove?\nA:"
    alone = _generate(lm, [prompt], [Sampler()], 12)[0]
    batch = _generate(lm, ["Q: x\nA:", prompt, "Q: " + "a long question " * 8 + "\nA:"], [Sampler()] * 3, 12)
    assert batch[1] == alone


def test_sampling_follows_each_rows_seed_not_its_batch_mates(lm: LoadedModel) -> None:
    prompt = "Q: Name a colour.\nA:"
    hot = Sampler(temperature=1.2, seed=11)
    alone = _generate(lm, [prompt], [hot], 10)[0]
    batch = _generate(lm, [prompt, prompt], [Sampler(temperature=1.2, seed=99), hot], 10)
    assert batch[1] == alone
    assert batch[0] != alone


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


def test_left_padding_by_hand_matches_the_tokenizers_own(lm: LoadedModel) -> None:
    prompts = ["Q: x\nA:", "Q: How many trees are in the grove?\nA:"]
    tokenizer: Any = lm.tokenizer
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    rows = [list(tokenizer(p)["input_ids"]) for p in prompts]

    padded = _left_padded(lm, rows)

    assert padded.input_ids.tolist() == batch["input_ids"].tolist()
    assert padded.attention_mask.tolist() == batch["attention_mask"].tolist()
    assert padded.past is None
