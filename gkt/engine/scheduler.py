"""The generation engine: continuous batching of many requests on one model, each with its own sampling.

A request joins the running batch at the next step (its prompt prefilled with the other arrivals',
reusing the shared few-shot prefix, and its first part when a request prepared it earlier) and leaves
it at the step it finishes — end of sequence, a stop string, its own token limit, cancellation or its
deadline — its cache rows freed at once. A finished row is never computed
again. The students, the local teacher backend and the offline evaluation all generate through it.

It stays one module (about 400 lines) because it is one step loop over shared batch state: admission,
prefill, the forward pass, sampling and retirement all read and write the same rows and key-value batch,
so split apart they would pass that state back and forth. What a caller holds (the request, its
`Generation` handle, the outbox, the result) lives in `gkt.engine.generation`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from gkt.decoding import Prefix, PrefixCache, TextTracker, context_tokens
from gkt.engine.batch import KvBatch, Layers
from gkt.engine.generation import EngineRequest, EngineResult, Generation, GenerationFailed
from gkt.engine.sampling import RowSampler
from gkt.models import EchoModel, LoadedModel

log = logging.getLogger(__name__)


class _Row:
    """A sequence in the running batch: what it has generated and the token to feed next."""

    def __init__(self, seq: Generation, lm: LoadedModel) -> None:
        request = seq.request
        self.seq = seq
        self.sampler = RowSampler(request.sampler)
        self.history = list(request.prompt_ids)
        self.position = len(request.prompt_ids)
        self.tracker = TextTracker(
            lm=lm,
            stop=request.stop,
            context=context_tokens(request.prompt_ids),
            strip_leading=request.strip_leading,
        )
        self.next_token = 0
        self.first_token_s = 0.0
        self.finish: str | None = None
        question = request.prompt.rsplit("Q: ", 1)[-1].split("\n", 1)[0]
        self.echo_source = list((question or "echo").encode())
        """The echo model's output: the bytes of the prompt's last question, cycling."""
        self.prefix: Prefix | None = None
        """The cached prefix its prompt starts with, if any (set at admission)."""
        self.prepared = False
        """Its first part came prepared from the prefix cache."""
        split = request.split_at
        self.split_at = split if split is not None and 0 < split < len(request.prompt_ids) else None

    def prefix_length(self) -> int:
        return len(self.prefix.ids) if self.prefix is not None else 0

    def suffix_length(self) -> int:
        """Prompt tokens to compute at admission: those after the cached prefix."""
        return self.position - self.prefix_length()

    def first_part_length(self) -> int:
        """Prompt tokens of the first pass of a split prompt: those after the cached prefix, up to the split."""
        return (self.split_at or 0) - self.prefix_length()

    def needs_first_pass(self) -> bool:
        return self.split_at is not None and self.prefix_length() < self.split_at


class Engine:
    """Continuous batching over one model. Drive it from one thread: `start()` runs a background loop
    (the students), or `generate()` steps in the caller's thread (the teacher, the evaluation)."""

    def __init__(
        self,
        lm: LoadedModel,
        *,
        max_batch: int = 16,
        prefix_cache: PrefixCache | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.lm = lm
        self.max_batch = max_batch
        self.prefix_cache = prefix_cache
        self._on_step = on_step
        self._eos = lm.eos_token_ids
        self._echo = isinstance(lm.model, EchoModel)
        self._waiting: deque[Generation] = deque()
        self._rows: list[_Row] = []
        self._admitting: list[_Row] = []
        self._batch = KvBatch()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closing = False

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: EngineRequest) -> Generation:
        seq = Generation(request)
        with self._lock:
            self._waiting.append(seq)
        self._wake.set()
        return seq

    def generate(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        """Run `requests` to the end in this thread (no background loop may be running)."""
        if self._thread is not None:
            raise RuntimeError("generate() steps the engine itself; this one runs a background loop")
        seqs = [self.submit(r) for r in requests]
        while any(s.result is None for s in seqs):
            self.step()
        return [s.result for s in seqs if s.result is not None]

    def start(self) -> None:
        """Step in a background thread whenever there is work."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gkt-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step: 1) admit waiting requests, 2) one forward pass for the batch,
        3) sample each row's next token, 4) retire the rows that finished.

        A step that fails fails every row it carried, the one being admitted included, and the engine
        goes on with an empty batch."""
        decoded = 0
        self._admitting = []
        try:
            self._admit()
            decoded = len(self._rows)
            if self._rows:
                logits = self._forward()
                for i, row in enumerate(self._rows):
                    if row.finish is None:
                        self._take(row, row.sampler.choose(row.history, logits[i : i + 1]))
            self._retire()
        except Exception as exc:
            log.exception("generation step failed")
            failure = GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}")
            for row in self._admitting:
                if all(row is not running for running in self._rows):
                    row.seq.emit(failure)
            self._fail_all(failure)
        if self._on_step is not None and decoded:
            self._on_step(decoded)

    # 1) admission -------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Take waiting requests into the free batch rows: a) find each prompt's cached prefix, b) prefill
        the first part of split prompts that were not prepared (and keep it), c) prefill the rest of every
        prompt. Arrivals are prefilled together, one forward pass per shared prefix, so they pause the
        running rows once, not once each. A request that only prepares ends after b)."""
        arrivals: list[_Row] = []
        while len(self._rows) + len(arrivals) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
            row = _Row(seq, self.lm)
            if self._stopped(row):
                self._finish(row)
            else:
                arrivals.append(row)
        self._admitting = arrivals
        for row in arrivals:
            self._match(row)
        # A question prepared and asked in the same step (the prepare came late) is computed once.
        first_parts: dict[tuple[int, ...], _Row] = {}
        for row in arrivals:
            if row.needs_first_pass():
                first_parts.setdefault(tuple(row.history[: row.split_at]), row)
        for group in self._runs(list(first_parts.values()), length=_Row.first_part_length):
            self._prepare(group)
        for row in arrivals:
            if row.needs_first_pass():
                row.prefix = first_parts[tuple(row.history[: row.split_at])].prefix
        generating = []
        for row in arrivals:
            if row.seq.request.max_new_tokens < 1:
                self._finish(row)
            else:
                generating.append(row)
        for group in self._runs(generating, length=_Row.suffix_length):
            for row, (first, layers) in zip(group, self._prefill(group), strict=True):
                self._take(row, first)
                if row.finish is None:
                    if layers is not None:
                        self._batch.add(layers)
                    self._rows.append(row)
                else:  # finished at its first token: it never joins the batch
                    self._finish(row)
        self._admitting = []

    def _match(self, row: _Row) -> None:
        """Set the row's cached prefix: its prepared first part, else the longest shared prefix (no longer
        than its split)."""
        if self.prefix_cache is None:
            return
        row.prefix = self.prefix_cache.match([row.history], split_at=row.split_at)
        row.prepared = row.prefix is not None and row.prefix.prepared

    @staticmethod
    def _runs(rows: list[_Row], *, length: Callable[[_Row], int]) -> Iterator[list[_Row]]:
        """Rows that share a cached prefix, in runs of similar `length` (padding at most a quarter of the
        run's tokens, or a few tokens a row: short prompts cost their pass's fixed overhead more than
        their padding)."""
        by_prefix: dict[tuple[int, ...], list[_Row]] = {}
        for row in rows:
            by_prefix.setdefault(row.prefix.ids if row.prefix is not None else (), []).append(row)
        for group in by_prefix.values():
            group.sort(key=length)
            run: list[_Row] = []
            for row in group:
                longest = length(row)
                real = sum(length(r) for r in run) + longest
                if run and longest * (len(run) + 1) > 1.25 * real + 16 * (len(run) + 1):
                    yield run
                    run = []
                run.append(row)
            if run:
                yield run

    def _prepare(self, rows: list[_Row]) -> None:
        """The first pass of split prompts: compute each row's tokens up to its split, keep them in the
        prefix cache (what follows the shared prefix), and make them the prefix the rest continues."""
        if self._echo:
            return
        prefix = rows[0].prefix
        start = len(prefix.ids) if prefix is not None else 0
        _, cache = self._forward_prompts(prefix, [row.history[start : row.split_at] for row in rows])
        for i, row in enumerate(rows):
            split = row.split_at or 0
            layers = tuple((k[i : i + 1, :, :split], v[i : i + 1, :, :split]) for k, v in cache)
            ids = tuple(row.history[:split])
            if self.prefix_cache is not None:
                self.prefix_cache.keep(
                    ids=ids, base=prefix, tail=[(k[:, :, start:], v[:, :, start:]) for k, v in layers]
                )
            row.prefix = Prefix(ids=ids, layers=layers)

    def _prefill(self, rows: list[_Row]) -> list[tuple[int, Layers | None]]:
        """Compute the rows' prompts (after their shared cached prefix) in one forward pass: each row's
        first token and its cache."""
        if self._echo:
            return [(self._echo_token(row, 0), None) for row in rows]
        prefix = rows[0].prefix
        start = len(prefix.ids) if prefix is not None else 0
        suffixes = [row.history[start:] for row in rows]
        logits, cache = self._forward_prompts(prefix, suffixes)
        prefilled: list[tuple[int, Layers | None]] = []
        for i, row in enumerate(rows):
            length = start + len(suffixes[i])
            layers: Layers = [(k[i : i + 1, :, :length], v[i : i + 1, :, :length]) for k, v in cache]
            prefilled.append((row.sampler.choose(row.history, logits[i : i + 1]), layers))
        return prefilled

    def _forward_prompts(
        self, prefix: Prefix | None, suffixes: list[list[int]]
    ) -> tuple[torch.Tensor, Layers]:
        """One forward pass over the token lists `suffixes` after the shared `prefix`: each one's last
        logits, and the cache of every layer (row i's real tokens first, then padding). Shorter lists are
        padded on the right, where causal attention keeps the padding out of every real token's
        computation, so each row's keys, values and logits are those it would have alone."""
        model: Any = self.lm.model
        device = self.lm.device
        start = len(prefix.ids) if prefix is not None else 0
        width = max(len(s) for s in suffixes)
        pad = int(self.lm.tokenizer.pad_token_id or 0)
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes], device=device)
        n = len(suffixes)
        past = DynamicCache()
        if prefix is not None:
            past = DynamicCache(
                ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix.layers]
            )
        out = model(
            input_ids=input_ids,
            attention_mask=torch.ones(n, start + width, dtype=torch.long, device=device),
            position_ids=torch.arange(start, start + width, device=device).expand(n, -1),
            past_key_values=past,
            use_cache=True,
            logits_to_keep=torch.tensor([[len(s) - 1] for s in suffixes], device=device),
        )
        cache = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return out.logits[:, -1, :].float(), cache

    # 2) the forward pass ------------------------------------------------------------------------
    def _forward(self) -> torch.Tensor:
        if self._echo:
            return torch.zeros(len(self._rows), 1)
        device = self.lm.device
        input_ids = torch.tensor([[row.next_token] for row in self._rows], device=device)
        position_ids = torch.tensor([[row.position] for row in self._rows], device=device)
        mask = self._batch.begin_step()
        model: Any = self.lm.model
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=self._batch.cache,
            use_cache=True,
        )
        self._batch.end_step()
        for row in self._rows:
            row.position += 1
        return out.logits[:, -1, :].float()

    # 3) one token of one row --------------------------------------------------------------------
    def _take(self, row: _Row, token: int) -> None:
        if self._echo and row.tracker.tokens:
            token = self._echo_token(row, len(row.tracker.tokens))
        if not row.tracker.tokens:
            row.first_token_s = time.perf_counter() - row.seq.submitted
        row.next_token = token
        row.history.append(token)
        if token in self._eos:
            row.finish = "eos"
            return
        delta = row.tracker.push(token)
        if delta:
            row.seq.emit(delta)
        if row.tracker.stopped:
            row.finish = "stop"
        elif len(row.tracker.tokens) >= row.seq.request.max_new_tokens:
            row.finish = "length"

    def _stopped(self, row: _Row) -> bool:
        """Mark the row finished when it was cancelled or its deadline passed."""
        request = row.seq.request
        if row.seq.stopping():
            row.finish = "cancelled"
        elif request.deadline is not None and time.time() >= request.deadline:
            row.finish = "deadline"
        return row.finish is not None

    # 4) retirement ------------------------------------------------------------------------------
    def _retire(self) -> None:
        """Finish the rows that stopped; the last row takes each one's place in the batch."""
        for i in reversed(range(len(self._rows))):
            row = self._rows[i]
            if row.finish is None and not self._stopped(row):
                continue
            self._finish(row)
            if not self._echo:
                self._batch.remove(i)
            self._rows[i] = self._rows[-1]
            self._rows.pop()

    def _finish(self, row: _Row) -> None:
        rest = row.tracker.flush()
        if rest:
            row.seq.emit(rest)
        row.seq.emit(
            EngineResult(
                text=row.tracker.text,
                token_count=row.tracker.token_count,
                finish_reason=row.finish or "length",
                tokens=tuple(row.history[len(row.seq.request.prompt_ids) :]),
                first_token_s=row.first_token_s,
                prepared=row.prepared,
            )
        )

    def _fail_all(self, exc: BaseException) -> None:
        for row in self._rows:
            row.seq.emit(exc)
        self._rows = []
        self._batch.clear()

    @staticmethod
    def _echo_token(row: _Row, step: int) -> int:
        return row.echo_source[step % len(row.echo_source)]

    def _loop(self) -> None:
        while not self._closing:
            if not self._rows and not self._waiting:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            self.step()
