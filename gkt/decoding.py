"""Token-by-token decoding over a KV cache: batched for the teacher, streamed at batch 1 for a student."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gkt.models import LoadedModel


@dataclass(frozen=True, kw_only=True)
class Sampler:
    """How one row picks its next token; a row's own seed makes it independent of its batch-mates."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0


class _RowSampler:
    def __init__(self, sampler: Sampler) -> None:
        self.greedy = sampler.temperature == 0.0
        processors = LogitsProcessorList()
        if sampler.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(sampler.repetition_penalty))
        if not self.greedy:
            processors.append(TemperatureLogitsWarper(sampler.temperature))
            if sampler.top_k > 0:
                processors.append(TopKLogitsWarper(sampler.top_k))
            if sampler.top_p < 1.0:
                processors.append(TopPLogitsWarper(sampler.top_p))
        self.processors = processors
        self.generator = torch.Generator().manual_seed(sampler.seed)

    def choose(self, history: torch.Tensor, logits: torch.Tensor) -> int:
        scores = self.processors(history, logits) if self.processors else logits  # type: ignore[arg-type]
        if self.greedy:
            return int(scores.argmax(-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


@torch.inference_mode()
def decode_steps(
    *, lm: LoadedModel, prompts: Sequence[str], samplers: Sequence[Sampler]
) -> Iterator[list[int]]:
    """Yield the next token of every row, one forward pass per step, until the caller stops.

    Prompts are left-padded into one batch; position ids follow the attention mask so a padded
    row sees exactly the positions it would see alone.
    """
    batch = lm.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=True)
    input_ids = batch["input_ids"].to(lm.device)
    attention_mask = batch["attention_mask"].to(lm.device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    rows = [_RowSampler(s) for s in samplers]
    history = input_ids
    out = lm.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    while True:
        logits = out.logits[:, -1, :].float()
        tokens = [row.choose(history[i : i + 1], logits[i : i + 1]) for i, row in enumerate(rows)]
        yield tokens
        next_ids = torch.tensor(tokens, device=lm.device).unsqueeze(-1)
        history = torch.cat([history, next_ids], dim=-1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids)], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        out = lm.model(
            input_ids=next_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=out.past_key_values,
            use_cache=True,
        )


@dataclass
class TextTracker:
    """Turns generated tokens into text: safe deltas for streaming, cut at the first stop string.

    A delta never holds a partial UTF-8 character nor the start of a possible stop string.
    """

    lm: LoadedModel
    stop: tuple[str, ...]
    context: list[int] = field(default_factory=list)
    """A few prompt tokens decoded with the output, so a leading space is not lost."""
    tokens: list[int] = field(default_factory=list)
    token_ends: list[int] = field(default_factory=list)
    text: str = ""
    strip_leading: bool = False
    """Drop leading whitespace (a student answering with no guidance starts after "A:")."""
    emitted: int = 0
    stopped: bool = False

    def __post_init__(self) -> None:
        self._prefix = str(self.lm.tokenizer.decode(self.context, skip_special_tokens=True))

    def push(self, token: int) -> str:
        """Add one token; return the text that became safe to show."""
        self.tokens.append(token)
        full = str(self.lm.tokenizer.decode(self.context + self.tokens, skip_special_tokens=True))
        text = full[len(self._prefix) :] if full.startswith(self._prefix) else full
        if self.strip_leading:
            text = text.lstrip()
        self.token_ends.append(len(text))
        cut = _first_stop(text, self.stop)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._take(len(self.text))
        self.text = text
        if text.endswith("\ufffd"):
            return ""
        return self._take(len(text) - _held_back(text, self.stop))

    def flush(self) -> str:
        """The text held back so far; safe to show once generation has ended."""
        return self._take(len(self.text))

    @property
    def token_count(self) -> int:
        """Tokens that contributed to the kept text (all of them unless a stop string cut it)."""
        if not self.stopped:
            return len(self.tokens)
        starts = [0, *self.token_ends[:-1]]
        return sum(1 for start in starts if start < len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted : upto], upto
        return delta


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could begin a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest


def context_tokens(lm: LoadedModel, prompt: str, n: int = 4) -> list[int]:
    """The last `n` prompt tokens, for `TextTracker.context`."""
    ids: list[int] = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids[-n:]
