"""Per-row sampling: each row picks its next token with its own settings and its own seeded generator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True, kw_only=True)
class Sampler:
    """How one row picks its next token; a row's own seed makes it independent of its batch-mates."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0


class RowSampler:
    """The processors and the random generator of one row, built once when the row joins a batch."""

    def __init__(self, sampler: Sampler) -> None:
        self.greedy = sampler.temperature == 0.0
        processors = LogitsProcessorList()
        self.needs_history = sampler.repetition_penalty != 1.0
        if self.needs_history:
            processors.append(RepetitionPenaltyLogitsProcessor(sampler.repetition_penalty))
        if not self.greedy:
            processors.append(TemperatureLogitsWarper(sampler.temperature))
            if sampler.top_k > 0:
                processors.append(TopKLogitsWarper(sampler.top_k))
            if sampler.top_p < 1.0:
                processors.append(TopPLogitsWarper(sampler.top_p))
        self.processors = processors
        self.generator = torch.Generator().manual_seed(sampler.seed)

    def choose(self, history: Sequence[int], logits: torch.Tensor) -> int:
        """The next token from one row's logits (shape [1, vocab]); `history`: the row's tokens so far."""
        if self.processors:
            ids = torch.tensor([list(history) if self.needs_history else [0]], device=logits.device)
            logits = self.processors(ids, logits)  # type: ignore[arg-type]
        if self.greedy:
            return int(logits.argmax(-1))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))
