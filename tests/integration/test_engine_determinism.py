"""Seeded determinism on the bundled student: a request's text is the same alone and among batch-mates
that join and leave around it, greedy or sampled."""

from __future__ import annotations

import pytest

from gkt.config import CommonSettings
from gkt.decoding import PrefixCache, encode, few_shot_prefixes
from gkt.engine import Engine, EngineRequest, Sampler
from gkt.jobs import GuidanceMode, Task
from gkt.models import LoadedModel, load_model
from gkt.prompts import STOP_SEQUENCE, student_prompt

CACHE = CommonSettings().model_cache_dir
QUESTIONS = (
    "Tom has 3 boxes with 4 apples in each box. How many apples does Tom have?",
    "A baker makes 12 loaves a day for 5 days and sells 40. How many are left?",
    "Sara reads 15 pages each night. How many pages does she read in a week?",
    "A train travels 60 miles per hour for 3 hours. How far does it go?",
)
SAMPLERS = (
    Sampler(),
    Sampler(temperature=0.8, top_p=0.95, seed=7),
    Sampler(temperature=1.0, top_k=40, seed=11),
    Sampler(temperature=0.7, top_p=0.9, repetition_penalty=1.2, seed=3),
)


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model(name="smollm2-135m-instruct", cache_dir=CACHE)


def _requests(lm: LoadedModel, n: int) -> list[EngineRequest]:
    requests = []
    for i in range(n):
        prompt = student_prompt(task=Task.GSM8K, query=QUESTIONS[i % len(QUESTIONS)], guidance="Tom has")
        requests.append(
            EngineRequest(
                prompt_ids=encode(lm, prompt),
                sampler=SAMPLERS[i % len(SAMPLERS)],
                max_new_tokens=8 + 4 * (i % 5),
                stop=(STOP_SEQUENCE,),
                prompt=prompt,
            )
        )
    return requests


@pytest.mark.real_models
def test_the_bundled_student_gives_each_seeded_request_the_same_text_alone_and_batched(
    lm: LoadedModel,
) -> None:
    cache = PrefixCache(lm, texts=few_shot_prefixes(modes=[GuidanceMode.CUTOFF]))
    requests = _requests(lm, 12)
    alone = [Engine(lm, max_batch=1, prefix_cache=cache).generate([r])[0] for r in requests]

    for arrivals_per_step in (1, 3):  # alone, or prefilled together with other arrivals
        engine = Engine(lm, max_batch=6, prefix_cache=cache)
        generations = []
        for i, request in enumerate(requests):  # each joins a batch already decoding; short ones leave early
            generations.append(engine.submit(request))
            if i % arrivals_per_step == arrivals_per_step - 1:
                engine.step()
        while any(g.result is None for g in generations):
            engine.step()
        assert [g.result for g in generations] == alone, f"{arrivals_per_step} arrivals per step"
