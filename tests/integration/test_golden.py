"""Golden outputs of the bundled models: a broken GGUF loader or a library upgrade fails loudly here.

Also on the bundled models: reusing the few-shot prefix's KV cache decodes the same greedy tokens as
a full prefill (Gemma 3's sliding window, 512, is shorter than its ~750-token CSQA prompts).

Recorded once with the pinned stack (transformers 5.23.0, torch 2.13.0 CPU, float32): the greedy
continuation of a fixed prompt, 20 tokens. They equal `model.generate(do_sample=False)` of the same
versions. If a deliberate upgrade changes them, re-check the text is sane and record the new values.
"""

from __future__ import annotations

import pytest

from gkt.config import CommonSettings
from gkt.decoding import PrefixCache, encode, few_shot_prefixes
from gkt.engine import Engine, EngineRequest
from gkt.jobs import GuidanceMode, Task
from gkt.models import LoadedModel, load_model
from gkt.prompts import teacher_prompt

PROMPT = "The capital of France is"
GOLDEN = {
    "gemma-3-270m": (
        " the capital of the country of France. It is the largest city in France and the second largest city",
        [
            506,
            5279,
            529,
            506,
            2891,
            529,
            7001,
            236761,
            1030,
            563,
            506,
            7488,
            3207,
            528,
            7001,
            532,
            506,
            1855,
            7488,
            3207,
        ],
    ),
    "smollm2-135m-instruct": (
        " Paris.\n\nThe answer is: 2018-01-22 ",
        [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33, 29, 34, 34, 216],
    ),
}
CACHE = CommonSettings().model_cache_dir


@pytest.mark.real_models
@pytest.mark.parametrize("alias", sorted(GOLDEN))
def test_bundled_model_greedy_continuation_matches_the_recording(alias: str) -> None:
    lm = load_model(name=alias, cache_dir=CACHE)
    engine = Engine(lm)
    generation = engine.submit(EngineRequest(prompt_ids=encode(lm, PROMPT), max_new_tokens=20, prompt=PROMPT))
    while generation.result is None:
        engine.step()
    text, tokens = GOLDEN[alias]
    assert generation.result.finish_reason == "length"
    assert generation.result.text == text
    assert list(generation.result.tokens) == tokens


CSQA_QUERIES = (
    "Where would you put a plate after washing it?\nAnswer Choices: (A) restaurant (B) cupboard "
    "(C) table (D) dishwasher (E) flea market",
    "What do people do when they are tired?\nAnswer Choices: (A) sleep (B) run (C) sing (D) swim (E) cook",
    "A revolving door is convenient for two direction travel, but it also serves as a security measure "
    "at a what?\nAnswer Choices: (A) bank (B) library (C) department store (D) mall (E) new york",
)


def _greedy(lm: LoadedModel, prompts: list[str], cache: PrefixCache | None, n: int) -> list[str]:
    requests = [EngineRequest(prompt_ids=encode(lm, p), max_new_tokens=n, prompt=p) for p in prompts]
    return [r.text for r in Engine(lm, prefix_cache=cache).generate(requests)]


@pytest.mark.real_models
@pytest.mark.parametrize("alias", sorted(GOLDEN))
def test_prefix_reuse_decodes_the_same_greedy_tokens_on_the_bundled_models(alias: str) -> None:
    lm = load_model(name=alias, cache_dir=CACHE)
    prompts = [teacher_prompt(task=Task.CSQA, mode=GuidanceMode.CUTOFF, query=q) for q in CSQA_QUERIES]
    cache = PrefixCache(lm, texts=few_shot_prefixes())

    assert _greedy(lm, prompts, cache, 10) == _greedy(lm, prompts, None, 10)
    assert _greedy(lm, prompts[2:], cache, 20) == _greedy(lm, prompts[2:], None, 20)
    assert cache.hits == 4
