"""Per-row sampling: each row picks its next token with its own settings and its own seeded generator.

Sampling works on the few hundred most likely tokens rather than sorting the whole vocabulary for
every row at every step: the nucleus (top-p) is found among them whenever they hold its mass, which at
ordinary temperatures they do, and a full sort decides otherwise. A row's choice depends only on its
own logits, settings and generator, never on its batch-mates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

CANDIDATES = 256
"""Most likely tokens looked at first for top-p (a full sort only when they hold too little mass)."""


@dataclass(frozen=True, kw_only=True)
class Sampler:
    """How one row picks its next token; a row's own seed makes it independent of its batch-mates."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0


class RowSampler:
    """One row's settings and random generator, built once when the row joins a batch.

    The order is the usual one: repetition penalty, temperature, top-k, then top-p; temperature 0 is
    greedy (the penalty still applies).
    """

    def __init__(self, sampler: Sampler) -> None:
        self.settings = sampler
        self.greedy = sampler.temperature == 0.0
        self.needs_history = sampler.repetition_penalty != 1.0
        self.generator = torch.Generator().manual_seed(sampler.seed)

    def choose(self, history: Sequence[int], logits: torch.Tensor) -> int:
        """The next token from one row's logits (shape [1, vocab]); `history`: the row's tokens so far."""
        scores = logits[0].float()
        if self.needs_history:
            scores = _penalized(scores, history, self.settings.repetition_penalty)
        if self.greedy:
            return int(scores.argmax())
        scores = scores / self.settings.temperature
        top_k, top_p = self.settings.top_k, self.settings.top_p
        if top_k > 0:
            values, indices = torch.topk(scores, min(top_k, scores.numel()))
            probs = torch.softmax(values, dim=0)
        elif top_p < 1.0:
            values, indices = torch.topk(scores, min(CANDIDATES, scores.numel()))
            probs = torch.exp(values - torch.logsumexp(scores, dim=0))
            if probs.sum() < top_p:  # a flat distribution: the nucleus reaches beyond the candidates
                values, indices = torch.sort(scores, descending=True)
                probs = torch.softmax(values, dim=0)
        else:
            return int(torch.multinomial(torch.softmax(scores, dim=0).cpu(), 1, generator=self.generator))
        if top_p < 1.0:
            keep = torch.cumsum(probs, dim=0) - probs < top_p  # the most likely token is always kept
            probs, indices = probs[keep], indices[keep]
        choice = torch.multinomial(probs.cpu(), 1, generator=self.generator)
        return int(indices[int(choice)])


def _penalized(scores: torch.Tensor, history: Sequence[int], penalty: float) -> torch.Tensor:
    """Tokens already seen made less likely: positive logits divided by `penalty`, negative ones
    multiplied by it."""
    seen = torch.tensor(sorted(set(history)), dtype=torch.long, device=scores.device)
    picked = scores.index_select(0, seen)
    scores = scores.clone()
    scores[seen] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores
