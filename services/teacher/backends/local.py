"""The in-process backend: one batched, left-padded transformers generation per batch.

The few-shot prefix every prompt of a task shares is prefilled once per worker and reused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from gkt.decoding import (
    PrefixCache,
    Sampler,
    TextTracker,
    check_room,
    context_tokens,
    decode_steps,
    encode,
    few_shot_prefixes,
)
from gkt.errors import InvalidArgument
from gkt.jobs import GuidanceMode
from gkt.models import LoadedModel, load_model
from services.teacher.backends.base import BackendError, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


class LocalBackend:
    """Runs the teacher model inside the worker (the embedded default; CPU or one GPU)."""

    name = "local"

    def __init__(
        self,
        *,
        model: str,
        cache_dir: Path,
        device: str = "cpu",
        dtype: str = "float32",
        prefix_cache: bool = True,
    ) -> None:
        self._model, self._cache_dir, self._device, self._dtype = model, cache_dir, device, dtype
        self._reuse_prefixes = prefix_cache
        self._lm: LoadedModel | None = None
        self._prefixes: PrefixCache | None = None

    @classmethod
    def from_loaded(cls, lm: LoadedModel, *, warm: bool = False, prefix_cache: bool = True) -> LocalBackend:
        backend = cls(model=lm.name, cache_dir=Path("."), prefix_cache=prefix_cache)
        backend._attach(lm, warm=warm)
        return backend

    async def start(self) -> None:
        if self._lm is None:
            lm = await asyncio.to_thread(
                load_model,
                name=self._model,
                cache_dir=self._cache_dir,
                device=self._device,
                dtype=self._dtype,
            )
            await asyncio.to_thread(self._attach, lm, warm=True)

    def _attach(self, lm: LoadedModel, *, warm: bool) -> None:
        """Use `lm`; with `warm`, prefill the default mode's prefixes and run one step, so job 1 is not slow."""
        self._lm = lm
        self._prefixes = PrefixCache(lm, texts=few_shot_prefixes()) if self._reuse_prefixes else None
        if warm and self._prefixes is not None:
            self._prefixes.warm(few_shot_prefixes(modes=[GuidanceMode.CUTOFF]))
        if warm:
            next(decode_steps(lm=lm, prompts=["Q: 1+1?\nA:"], samplers=[Sampler()]))

    def check_limits(self, *, max_new_tokens: int) -> None:
        context = self._loaded().context_window
        if context is not None and max_new_tokens >= context:
            raise ValueError(
                f"guidance of {max_new_tokens} tokens leaves no room for a prompt: the model's context is {context}"
            )

    async def generate_batch(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | BackendError]:
        if not requests:
            return []
        try:
            return await asyncio.to_thread(self._generate_fitting, requests)
        except Exception as exc:  # a failed forward pass fails the whole batch it ran
            log.exception("local teacher generation failed")
            return [BackendError(f"teacher generation failed: {exc}", code="INTERNAL", kind="local")] * len(
                requests
            )

    def _generate_fitting(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | BackendError]:
        """`generate_sync` for the requests whose prompt and guidance fit the model's context; each other
        request fails alone with `INVALID_ARGUMENT`, without costing its batch-mates a forward pass."""
        lm = self._loaded()
        slots: list[GenerationResult | BackendError | None] = []
        fitting: list[GenerationRequest] = []
        token_ids: list[list[int]] = []
        for request in requests:
            ids = encode(lm, request.prompt)
            try:
                check_room(
                    lm,
                    prompt_tokens=len(ids),
                    max_new_tokens=request.max_new_tokens,
                    length_field="guidance.max_guidance_tokens",
                )
            except InvalidArgument as exc:
                slots.append(BackendError(exc.description, code=exc.code, kind="invalid", field=exc.field))
                continue
            slots.append(None)
            fitting.append(request)
            token_ids.append(ids)
        results = iter(self.generate_sync(fitting, token_ids=token_ids) if fitting else [])
        return [slot if slot is not None else next(results) for slot in slots]

    def generate_sync(
        self, requests: Sequence[GenerationRequest], *, token_ids: Sequence[Sequence[int]] | None = None
    ) -> list[GenerationResult]:
        """Generate for every request in one batch (`token_ids`: the prompts already encoded)."""
        lm = self._loaded()
        rows = token_ids if token_ids is not None else [encode(lm, r.prompt) for r in requests]
        trackers = [
            TextTracker(lm=lm, stop=r.stop, context=context_tokens(ids))
            for r, ids in zip(requests, rows, strict=True)
        ]
        samplers = [Sampler(temperature=r.temperature, top_p=r.top_p, seed=r.seed) for r in requests]
        finish: list[str | None] = [None] * len(requests)
        eos = lm.eos_token_ids
        steps = decode_steps(
            lm=lm,
            prompts=[r.prompt for r in requests],
            samplers=samplers,
            prefix_cache=self._prefixes,
            token_ids=rows,
        )
        for tokens in steps:
            for i, token in enumerate(tokens):
                if finish[i] is not None:
                    continue
                if token in eos:
                    finish[i] = "eos"
                    continue
                trackers[i].push(token)
                if trackers[i].stopped:
                    finish[i] = "stop"
                elif len(trackers[i].tokens) >= requests[i].max_new_tokens:
                    finish[i] = "length"
            if all(f is not None for f in finish):
                break
        return [
            GenerationResult(text=t.text, token_count=t.token_count, finish_reason=f or "length")
            for t, f in zip(trackers, finish, strict=True)
        ]

    async def close(self) -> None:
        self._lm = self._prefixes = None

    def _loaded(self) -> LoadedModel:
        if self._lm is None:
            raise RuntimeError("LocalBackend.start() was not awaited")
        return self._lm
