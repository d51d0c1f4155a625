"""How often a seeded request's text is the same alone and among batch-mates (the `determinism` scenario).

Floating-point sums in a batched forward pass may round differently from the same row alone, and a
sampled token can flip when a draw lands on a boundary. This measures it: each request runs alone
(max batch 1) and inside a continuously changing batch (rows joining every step, others leaving).
"""

from __future__ import annotations

import random
import time
from typing import Any

from gkt.decoding import PrefixCache, encode, few_shot_prefixes
from gkt.engine import Engine, EngineRequest, Sampler
from gkt.jobs import GuidanceMode, Task
from gkt.models import LoadedModel
from gkt.prompts import STOP_SEQUENCE, student_prompt


def requests(
    lm: LoadedModel, questions: list[str], *, count: int, max_new_tokens: int
) -> list[EngineRequest]:
    """`count` GSM8K student requests: half greedy, half sampled with varied settings, each its own seed."""
    out = []
    for i in range(count):
        prompt = student_prompt(task=Task.GSM8K, query=questions[i % len(questions)], guidance="Let's think.")
        sampler = (
            Sampler(seed=i)
            if i % 2 == 0
            else Sampler(
                temperature=(0.6, 0.8, 1.0)[i % 3],
                top_p=(0.9, 0.95, 1.0)[i % 3],
                top_k=(0, 50)[i % 4 // 2],
                repetition_penalty=(1.0, 1.1)[i % 5 // 4],
                seed=i,
            )
        )
        out.append(
            EngineRequest(
                prompt_ids=encode(lm, prompt),
                sampler=sampler,
                max_new_tokens=max_new_tokens,
                stop=(STOP_SEQUENCE,),
                prompt=prompt,
            )
        )
    return out


def measure(lm: LoadedModel, batch: list[EngineRequest], *, max_batch: int, seed: int = 0) -> dict[str, Any]:
    """Run `batch` alone and batched; count the requests whose text and tokens agree."""
    prefixes = PrefixCache(lm, texts=few_shot_prefixes(modes=[GuidanceMode.CUTOFF]))
    prefixes.warm()
    started = time.perf_counter()
    alone = [Engine(lm, max_batch=1, prefix_cache=prefixes).generate([r])[0] for r in batch]
    alone_s = time.perf_counter() - started
    order = list(range(len(batch)))
    random.Random(seed).shuffle(order)  # batch-mates differ from the order above
    engine = Engine(lm, max_batch=max_batch, prefix_cache=prefixes)
    generations: dict[int, Any] = {}
    started = time.perf_counter()
    for i in order:  # one arrival per step: every row joins a batch already decoding
        generations[i] = engine.submit(batch[i])
        engine.step()
    while any(g.result is None for g in generations.values()):
        engine.step()
    batched_s = time.perf_counter() - started
    same = [generations[i].result == alone[i] for i in range(len(batch))]
    greedy = [i for i, r in enumerate(batch) if r.sampler.temperature == 0]
    sampled = [i for i, r in enumerate(batch) if r.sampler.temperature > 0]
    return {
        "requests": len(batch),
        "max_batch": max_batch,
        "identical": sum(same),
        "identical_greedy": sum(same[i] for i in greedy),
        "greedy": len(greedy),
        "identical_sampled": sum(same[i] for i in sampled),
        "sampled": len(sampled),
        "alone_s": alone_s,
        "batched_s": batched_s,
    }
