"""What decoding needs around the model: tokens in, text out, and the KV cache of shared prefixes.

A `PrefixCache` keeps the KV cache of prompt prefixes every job shares (the few-shot exemplars), so
a job pays only for the tokens after them, and of prompts prepared before their end was known (a
student's question, computed while the teacher writes its guidance); a `TextTracker` turns a row's
tokens into safe text deltas.
The decode loop itself is `gkt.engine`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from gkt.errors import InvalidArgument
from gkt.jobs import GuidanceMode, Task
from gkt.models import EchoModel, LoadedModel
from gkt.prompts import teacher_prompt
from gkt.stops import first_stop, held_back


@dataclass(frozen=True)
class Prefix:
    """The tokens of a shared prefix and, per layer, its keys and values for one row."""

    ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    prepared: bool = False
    """A prepared prompt's (`PrefixCache.keep`) rather than a shared few-shot prefix."""


@dataclass(frozen=True)
class _Prepared:
    """A prepared prompt's keys and values after the few-shot prefix they were computed on."""

    base: Prefix | None
    tail: tuple[tuple[torch.Tensor, torch.Tensor], ...]


class PrefixCache:
    """KV caches of the prompt prefixes every job shares (the few-shot exemplars), kept per worker.

    A prefix is reused only when a prompt's own tokenization starts with the prefix's tokens, so the
    model sees exactly the token sequence it would see without reuse. The last token of a prefix is
    left out of it: a tokenizer may merge it with the text that follows. The least recently used
    prefix is dropped beyond `max_entries`.

    It also keeps up to `max_prepared` prepared prompts (the least recently used dropped first): the
    first tokens of a prompt computed before the rest of it was known, found again by exactly those
    token ids. Only what follows the few-shot prefix is stored, so an entry costs the question's tokens.
    """

    def __init__(
        self, lm: LoadedModel, *, texts: Iterable[str], max_entries: int = 8, max_prepared: int = 32
    ) -> None:
        self.lm = lm
        self.max_entries = max_entries
        self.max_prepared = max_prepared
        self.hits = 0
        self.misses = 0
        self.prepared_hits = 0
        self._prepared: OrderedDict[tuple[int, ...], _Prepared] = OrderedDict()
        self._ids = {text: self._tokenize(text) for text in dict.fromkeys(texts)}
        self._ids = {text: ids for text, ids in self._ids.items() if ids}
        self._computed: OrderedDict[str, Prefix] = OrderedDict()

    def warm(self, texts: Iterable[str] | None = None) -> None:
        """Compute the caches now (at worker start) rather than in the first job that needs them."""
        for text in list(texts if texts is not None else self._ids)[: self.max_entries]:
            if text in self._ids:
                self._entry(text)

    def match(self, rows: Sequence[Sequence[int]], *, split_at: int | None = None) -> Prefix | None:
        """The longest known prefix that every row starts with (and goes beyond), or None.

        With `split_at`: the rows' first `split_at` tokens when they were prepared, else the longest
        few-shot prefix no longer than that (a prepared prompt is found by its exact split, so a row
        computes its tokens the same way whether or not they were prepared)."""
        if split_at is not None and rows and all(len(row) > split_at for row in rows):
            wanted = tuple(rows[0][:split_at])
            if all(tuple(row[:split_at]) == wanted for row in rows) and wanted in self._prepared:
                self._prepared.move_to_end(wanted)
                self.prepared_hits += 1
                return self._joined(wanted, self._prepared[wanted])
        best: str | None = None
        for text, ids in self._ids.items():
            if best is not None and len(ids) <= len(self._ids[best]):
                continue
            if split_at is not None and len(ids) > split_at:
                continue
            if all(len(row) > len(ids) and tuple(row[: len(ids)]) == ids for row in rows):
                best = text
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        return self._entry(best)

    def keep(
        self, *, ids: tuple[int, ...], base: Prefix | None, tail: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Keep a prepared prompt: its token ids, the few-shot prefix it was computed on (None: from its
        first token), and per layer the keys and values of its tokens after that prefix (copied, so the
        batch they were sliced from can be freed)."""
        if self.max_prepared < 1:
            return
        copied = tuple((k.clone(), v.clone()) for k, v in tail)
        self._prepared[ids] = _Prepared(base=base, tail=copied)
        self._prepared.move_to_end(ids)
        while len(self._prepared) > self.max_prepared:
            self._prepared.popitem(last=False)

    @property
    def prepared(self) -> int:
        """Prepared prompts kept now."""
        return len(self._prepared)

    @staticmethod
    def _joined(ids: tuple[int, ...], entry: _Prepared) -> Prefix:
        if entry.base is None:
            return Prefix(ids=ids, layers=entry.tail, prepared=True)
        layers = tuple(
            (torch.cat([bk, tk], dim=2), torch.cat([bv, tv], dim=2))
            for (bk, bv), (tk, tv) in zip(entry.base.layers, entry.tail, strict=True)
        )
        return Prefix(ids=ids, layers=layers, prepared=True)

    def _tokenize(self, text: str) -> tuple[int, ...]:
        return tuple(encode(self.lm, text)[:-1])

    def _entry(self, text: str) -> Prefix:
        if text in self._computed:
            self._computed.move_to_end(text)
            return self._computed[text]
        ids = self._ids[text]
        model = self.lm.model
        assert not isinstance(model, EchoModel), "the echo model has no KV cache"
        input_ids = torch.tensor([ids], device=self.lm.device)
        with torch.inference_mode():
            out = model(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                position_ids=torch.arange(len(ids), device=self.lm.device).unsqueeze(0),
                # A cache without the config keeps every layer whole, sliding-window layers included:
                # a batch shifts each row's prefix by its padding, so no layer may drop early tokens.
                past_key_values=DynamicCache(),
                use_cache=True,
                logits_to_keep=1,
            )
        layers = tuple((layer.keys, layer.values) for layer in out.past_key_values.layers)
        self._computed[text] = Prefix(ids=ids, layers=layers)
        while len(self._computed) > self.max_entries:
            self._computed.popitem(last=False)
        return self._computed[text]


def few_shot_prefixes(*, modes: Iterable[GuidanceMode] | None = None) -> list[str]:
    """The text that precedes the question in every prompt of a task and guidance mode.

    Student prompts are task prompts, which are the `cutoff` teacher prompts, so the default set
    (every mode that asks the teacher) serves both roles.
    """
    marker = "\x00"
    chosen = modes if modes is not None else [m for m in GuidanceMode if m != GuidanceMode.NONE]
    prefixes: list[str] = []
    for task in Task:
        for mode in chosen:
            prompt = teacher_prompt(task=task, mode=mode, query=marker)
            prefixes.append(prompt[: prompt.index(f"Q: {marker}")])
    return [p for p in dict.fromkeys(prefixes) if p]


def encode(lm: LoadedModel, prompt: str) -> list[int]:
    """The prompt's token ids as the model sees them (special tokens included)."""
    return list(lm.tokenizer(prompt, add_special_tokens=True)["input_ids"])


def split_point(lm: LoadedModel, *, first_part: str, prompt_ids: Sequence[int]) -> int | None:
    """Where a prompt whose text starts with `first_part` splits (`EngineRequest.split_at`): after the
    first part's tokens but its last, which a tokenizer may merge with what follows; None when the
    prompt's own tokens do not start with those."""
    ids = encode(lm, first_part)[:-1]
    if ids and len(prompt_ids) > len(ids) and list(prompt_ids[: len(ids)]) == ids:
        return len(ids)
    return None


def check_room(
    lm: LoadedModel,
    *,
    prompt_tokens: int,
    max_new_tokens: int,
    length_field: str,
    prompt_field: str = "query",
) -> None:
    """Raise `InvalidArgument` when a prompt and the tokens asked of it do not fit the model's context.

    The field named is the one to change: the query when the prompt alone fills the context, else the
    length asked for, with the most that would fit.
    """
    context = lm.context_window
    if context is None or prompt_tokens + max_new_tokens <= context:
        return
    if prompt_tokens >= context:
        raise InvalidArgument(
            prompt_field,
            f"the prompt (the task's exemplars and the query) is {prompt_tokens} tokens for {lm.name}, "
            f"whose context is {context} tokens",
        )
    raise InvalidArgument(
        length_field,
        f"is {max_new_tokens}; the prompt is {prompt_tokens} tokens for {lm.name}, so its context of "
        f"{context} tokens leaves room for at most {context - prompt_tokens}",
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
        cut = first_stop(text, self.stop)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._take(len(self.text))
        self.text = text
        if text.endswith("\ufffd"):
            return ""
        return self._take(len(text) - held_back(text, self.stop))

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


def context_tokens(prompt_ids: Sequence[int], n: int = 4) -> list[int]:
    """The last `n` prompt tokens, for `TextTracker.context` (special ones are skipped when decoded)."""
    return list(prompt_ids[-n:])
