"""The in-process backend: every request joins the shared engine's running batch and leaves it when it ends.

The engine decodes in its own thread, continuously: a request submitted while others run joins at the
next step, so the pipelined teacher keeps it busy without waiting for a batch to finish. The few-shot
prefix every prompt of a task shares is prefilled once per worker and reused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gkt.decoding import PrefixCache, check_room, encode, few_shot_prefixes
from gkt.engine import Engine, EngineRequest, EngineResult, Generation, GenerationFailed, Sampler
from gkt.errors import InvalidArgument, StatusCode
from gkt.jobs import GuidanceMode
from gkt.models import LoadedModel, load_model
from services.teacher.backends.base import BackendError, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

_MAX_ROWS = 256
"""Rows the engine decodes at once unless told otherwise: more than any batch the teacher collects."""


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
        max_rows: int = _MAX_ROWS,
    ) -> None:
        self._model, self._cache_dir, self._device, self._dtype = model, cache_dir, device, dtype
        self._reuse_prefixes = prefix_cache
        self.concurrency = max_rows
        self._lm: LoadedModel | None = None
        self._engine: Engine | None = None
        # Each request's wait for its row runs on a thread of its own (the engine's results arrive on
        # thread-safe queues), so as many requests as the engine has rows can wait at once.
        self._waiters = ThreadPoolExecutor(max_workers=max_rows, thread_name_prefix="gkt-teacher-row")

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
        """Use `lm` and start the engine; with `warm`, prefill the default mode's prefixes and run one step
        first, so job 1 is not slow."""
        self._lm = lm
        prefixes = PrefixCache(lm, texts=few_shot_prefixes()) if self._reuse_prefixes else None
        if warm and prefixes is not None:
            prefixes.warm(few_shot_prefixes(modes=[GuidanceMode.CUTOFF]))
        self._engine = Engine(lm, max_batch=self.concurrency, prefix_cache=prefixes)
        if warm:
            self._engine.generate([EngineRequest(prompt_ids=encode(lm, "Q: 1+1?\nA:"), max_new_tokens=2)])
        self._engine.start()

    def check_limits(self, *, max_guidance_tokens: int) -> None:
        context = self._loaded().context_window
        if context is not None and max_guidance_tokens >= context:
            raise ValueError(
                f"guidance of {max_guidance_tokens} tokens leaves no room for a prompt: the model's context is {context}"
            )

    async def generate(self, request: GenerationRequest) -> GenerationResult | BackendError:
        """Join the running batch; a prompt that does not fit the model's context fails alone with
        `INVALID_ARGUMENT`, without costing anyone a forward pass."""
        loop = asyncio.get_running_loop()
        submitted = await loop.run_in_executor(self._waiters, self._submit, request)
        if isinstance(submitted, BackendError):
            return submitted
        try:
            return await loop.run_in_executor(self._waiters, _result, submitted)
        except asyncio.CancelledError:
            submitted.cancel()
            raise
        except GenerationFailed as exc:  # a failed forward pass fails every row it carried
            log.error("local teacher generation failed: %s", exc)
            return BackendError(f"teacher generation failed: {exc}", code=StatusCode.INTERNAL, kind="local")

    async def generate_batch(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | BackendError]:
        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    def generate_sync(
        self, requests: Sequence[GenerationRequest], *, token_ids: Sequence[Sequence[int]] | None = None
    ) -> list[GenerationResult]:
        """Generate for every request together, waiting in this thread (`token_ids`: the prompts already
        encoded)."""
        lm = self._loaded()
        rows = token_ids if token_ids is not None else [encode(lm, r.prompt) for r in requests]
        generations = [
            self._engine_of().submit(_engine_request(r, ids)) for r, ids in zip(requests, rows, strict=True)
        ]
        return [_result(g) for g in generations]

    async def close(self) -> None:
        if self._engine is not None:
            await asyncio.to_thread(self._engine.stop)
        self._waiters.shutdown(wait=False, cancel_futures=True)
        self._lm = self._engine = None

    def _submit(self, request: GenerationRequest) -> Generation | BackendError:
        lm = self._loaded()
        ids = encode(lm, request.prompt)
        try:
            check_room(
                lm,
                prompt_tokens=len(ids),
                max_new_tokens=request.max_guidance_tokens,
                length_field="guidance.max_guidance_tokens",
            )
        except InvalidArgument as exc:
            return BackendError(exc.description, code=exc.code, kind="invalid", field=exc.field)
        return self._engine_of().submit(_engine_request(request, ids))

    def _loaded(self) -> LoadedModel:
        if self._lm is None:
            raise RuntimeError("LocalBackend.start() was not awaited")
        return self._lm

    def _engine_of(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("LocalBackend.start() was not awaited")
        return self._engine


def _engine_request(request: GenerationRequest, prompt_ids: Sequence[int]) -> EngineRequest:
    return EngineRequest(
        prompt_ids=prompt_ids,
        sampler=Sampler(temperature=request.temperature, top_p=request.top_p, seed=request.seed),
        max_new_tokens=request.max_guidance_tokens,
        stop=request.stop,
        prompt=request.prompt,
    )


def _result(generation: Generation) -> GenerationResult:
    """Wait for the row to end (raises `GenerationFailed` when a forward pass failed it)."""
    result: EngineResult | None = None
    for item in generation.events():
        if isinstance(item, EngineResult):
            result = item
    assert result is not None
    return GenerationResult(
        text=result.text, token_count=result.token_count, finish_reason=result.finish_reason
    )
