"""The statistics of a report: Wilson intervals, the exact paired McNemar test, and answer counts."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

UNPARSED = "unparsed"
Z_95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95 % interval."""


def wilson_interval(successes: int, trials: int, *, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default), as fractions."""
    if trials <= 0:
        raise ValueError("a proportion needs at least one trial")
    p = successes / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_counts(baseline: Sequence[bool], other: Sequence[bool]) -> tuple[int, int]:
    """(right only in the baseline, right only in the other) over the same questions, in the same order."""
    if len(baseline) != len(other):
        raise ValueError(f"paired rows differ in length: {len(baseline)} and {len(other)}")
    only_baseline = sum(b and not o for b, o in zip(baseline, other, strict=True))
    only_other = sum(o and not b for b, o in zip(baseline, other, strict=True))
    return only_baseline, only_other


def mcnemar_exact(only_baseline: int, only_other: int) -> float:
    """The two-sided exact McNemar p-value: a binomial test of the discordant pairs at one half."""
    discordant = only_baseline + only_other
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_baseline, only_other) + 1))
    return min(1.0, 2 * tail / 2**discordant)


def answer_counts(answers: Iterable[str | None]) -> Counter[str]:
    """How often each answer was given; an answer that could not be read counts as `unparsed`."""
    return Counter(UNPARSED if a is None else a for a in answers)
