"""Prefix KV-cache reuse gives the tokens a full prefill gives: both tiny architectures, batched and alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from gkt.decoding import PrefixCache, encode, few_shot_prefixes
from gkt.engine import Engine, EngineRequest, Sampler
from gkt.jobs import GuidanceMode, Task
from gkt.models import LoadedModel, load_model
from gkt.prompts import student_prompt, teacher_prompt

STEPS = 12
QUERIES = (
    "Where would you put a plate after washing it?\nAnswer Choices: (A) restaurant (B) cupboard (C) table",
    "Why?",
    "A much longer question about the trees in the grove, the workers who plant them, and how many "
    "trees there will be after they are done today?\nAnswer Choices: (A) 6 (B) 21 (C) 15 (D) 36 (E) 0",
)


@pytest.fixture(scope="module", params=["teacher", "student"])
def lm(
    request: pytest.FixtureRequest, tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> LoadedModel:
    """The tiny Gemma 3 (sliding window 32, far shorter than the prefix) and the tiny Llama."""
    directory = tiny_models[0] if request.param == "teacher" else tiny_models[1]
    return load_model(name=str(directory), cache_dir=tmp_path_factory.mktemp("cache"))


def _generate(
    lm: LoadedModel, prompts: list[str], samplers: list[Sampler], prefix_cache: PrefixCache | None
) -> list[str]:
    """The text of each row after STEPS tokens, generated together on the engine."""
    requests = [
        EngineRequest(prompt_ids=encode(lm, p), sampler=s, max_new_tokens=STEPS, prompt=p)
        for p, s in zip(prompts, samplers, strict=True)
    ]
    return [r.text for r in Engine(lm, prefix_cache=prefix_cache).generate(requests)]


def test_a_padded_batch_decodes_the_same_tokens_with_and_without_the_prefix_cache(lm: LoadedModel) -> None:
    prompts = [teacher_prompt(task=Task.CSQA, mode=GuidanceMode.CUTOFF, query=q) for q in QUERIES]
    cache = PrefixCache(lm, texts=few_shot_prefixes())
    samplers = [Sampler(), Sampler(temperature=0.9, top_p=0.9, seed=3), Sampler()]

    reused = _generate(lm, prompts, samplers, cache)

    assert cache.hits == 3
    assert reused == _generate(lm, prompts, samplers, None)


def test_a_student_prompt_alone_decodes_the_same_tokens_with_the_prefix_cache(lm: LoadedModel) -> None:
    prompt = student_prompt(task=Task.GSM8K, query="How many apples are left?", guidance="There are 5")
    cache = PrefixCache(lm, texts=few_shot_prefixes())
    cache.warm()

    assert _generate(lm, [prompt], [Sampler()], cache) == _generate(lm, [prompt], [Sampler()], None)
    assert cache.hits == 1


def test_rows_of_different_tasks_in_one_batch_each_reuse_their_own_prefix(lm: LoadedModel) -> None:
    prompts = [
        teacher_prompt(task=Task.CSQA, mode=GuidanceMode.CUTOFF, query=QUERIES[0]),
        teacher_prompt(task=Task.GSM8K, mode=GuidanceMode.CUTOFF, query="How many apples?"),
    ]
    cache = PrefixCache(lm, texts=few_shot_prefixes())

    reused = _generate(lm, prompts, [Sampler(), Sampler()], cache)

    assert (cache.hits, cache.misses) == (2, 0)
    assert reused == _generate(lm, prompts, [Sampler(), Sampler()], None)


def test_the_longest_shared_prefix_wins_and_old_entries_are_evicted(lm: LoadedModel) -> None:
    cache = PrefixCache(lm, texts=few_shot_prefixes(), max_entries=1)
    hint = teacher_prompt(task=Task.AQUA, mode=GuidanceMode.HINT, query="What is 2 + 2?")
    plain = teacher_prompt(task=Task.AQUA, mode=GuidanceMode.CUTOFF, query="What is 2 + 2?")

    assert _generate(lm, [hint], [Sampler()], cache) == _generate(lm, [hint], [Sampler()], None)
    assert _generate(lm, [plain], [Sampler()], cache) == _generate(lm, [plain], [Sampler()], None)
    assert cache.hits == 2
    assert len(cache._computed) == 1


def test_a_prompt_without_a_known_prefix_is_prefilled_whole(lm: LoadedModel) -> None:
    prompt = "Q: What is the capital of France?\nA:"
    cache = PrefixCache(lm, texts=few_shot_prefixes())

    assert _generate(lm, [prompt], [Sampler()], cache) == _generate(lm, [prompt], [Sampler()], None)
    assert (cache.hits, cache.misses) == (0, 1)
