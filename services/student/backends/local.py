"""The `local` student backend: the model in this process, every job a row of its continuously batching
engine."""

from __future__ import annotations

import logging
import time

import torch

from gkt import metrics
from gkt.decoding import PrefixCache, check_room, encode, few_shot_prefixes, split_point
from gkt.engine import Engine, EngineRequest, EngineResult, Generation, Sampler
from gkt.jobs import GuidanceMode
from gkt.models import load_model
from services.student.backends.base import StudentRequest
from services.student.settings import StudentSettings

log = logging.getLogger(__name__)


class LocalStudentBackend:
    """Encodes each job, checks it fits the model's context, and hands it to the engine."""

    name = "local"
    prepares = True

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def load(cls, settings: StudentSettings) -> LocalStudentBackend:
        """Load the model, prefill the few-shot prefixes, warm up, and start the engine's thread."""
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        lm = load_model(
            name=settings.local_model,
            cache_dir=settings.model_cache_dir,
            device=settings.student_device,
            dtype=settings.student_dtype,
        )
        # Student prompts are task prompts: their shared prefixes are those of the `cutoff` mode.
        texts = few_shot_prefixes(modes=[GuidanceMode.CUTOFF]) if settings.student_prefix_cache else []
        prefixes = PrefixCache(lm, texts=texts, max_prepared=settings.student_prepared_prompts)
        engine = Engine(
            lm,
            max_batch=settings.student_max_batch,
            prefix_cache=prefixes,
            on_step=metrics.STUDENT_BATCH_ROWS.observe,
        )
        if settings.student_warmup:
            prefixes.warm()
            engine.generate([EngineRequest(prompt_ids=encode(lm, "Q: 1+1?\nA:"), max_new_tokens=2)])
        engine.start()
        return cls(engine)

    def check_limits(self, *, max_new_tokens: int) -> None:
        context = self.engine.lm.context_window
        if context is not None and max_new_tokens >= context:
            raise ValueError(
                f"GKT_STUDENT_MAX_NEW_TOKENS ({max_new_tokens}) leaves no room for a prompt: "
                f"{self.engine.lm.name}'s context is {context} tokens"
            )

    def prepare(self, first_part: str, *, timeout_s: float) -> bool:
        """Prefill the first part (the question) on the engine and keep it in the prefix cache."""
        lm = self.engine.lm
        prompt_ids = encode(lm, first_part)
        if lm.context_window is not None and len(prompt_ids) >= lm.context_window:
            return False  # the job itself will be refused
        split = split_point(lm, first_part=first_part, prompt_ids=prompt_ids)
        if split is None:
            return False
        generation = self.engine.submit(
            EngineRequest(
                prompt_ids=prompt_ids,
                max_new_tokens=0,
                split_at=split,
                deadline=time.time() + timeout_s,
                prompt=first_part,
            )
        )
        result = list(generation.events(timeout_s=timeout_s))[-1]
        return isinstance(result, EngineResult) and result.finish_reason == "length"

    def submit(self, request: StudentRequest) -> Generation:
        lm = self.engine.lm
        params = request.sampling
        prompt_ids = encode(lm, request.prompt)
        check_room(
            lm,
            prompt_tokens=len(prompt_ids),
            max_new_tokens=params.max_new_tokens,
            length_field="sampling.max_new_tokens",
        )
        # Split where the guidance starts, prepared or not: the job's tokens are the same either way.
        split = (
            split_point(lm, first_part=request.first_part, prompt_ids=prompt_ids)
            if request.first_part
            else None
        )
        return self.engine.submit(
            EngineRequest(
                prompt_ids=prompt_ids,
                split_at=split,
                sampler=Sampler(
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=params.top_k,
                    repetition_penalty=params.repetition_penalty,
                    seed=params.seed,
                ),
                max_new_tokens=params.max_new_tokens,
                stop=request.stop,
                strip_leading=request.strip_leading,
                deadline=request.deadline,
                cancelled=request.cancelled,
                prompt=request.prompt,
            )
        )

    def stop(self) -> None:
        self.engine.stop()
