"""Golden outputs of the bundled models: a broken GGUF loader or a library upgrade fails loudly here.

Recorded once with the pinned stack (transformers 5.23.0, torch 2.13.0 CPU, float32): the greedy
continuation of a fixed prompt, 20 tokens. They equal `model.generate(do_sample=False)` of the same
versions. If a deliberate upgrade changes them, re-check the text is sane and record the new values.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gkt.decoding import Sampler, TextTracker, decode_steps
from gkt.models import load_model

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
CACHE = Path(os.environ.get("GKT_MODEL_CACHE_DIR", Path.home() / ".cache" / "gkt" / "models"))


@pytest.mark.real_models
@pytest.mark.parametrize("alias", sorted(GOLDEN))
def test_bundled_model_greedy_continuation_matches_the_recording(alias: str) -> None:
    lm = load_model(name=alias, cache_dir=CACHE)
    tracker = TextTracker(lm=lm, stop=())
    for step, (token,) in enumerate(decode_steps(lm=lm, prompts=[PROMPT], samplers=[Sampler()])):
        tracker.push(token)
        if step == 19:
            break
    text, tokens = GOLDEN[alias]
    assert tracker.tokens == tokens
    assert tracker.text == text
