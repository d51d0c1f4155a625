"""The scenarios on the bundled models, sharing one stack: `batching` (teacher throughput under load against
an offline batched generate), `student` (a job's time against a bare `model.generate`) and `gkt` (GKT
against each model alone)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from gkt.jobs import Task
from gkt_tools.bench.runs import closed_loop_on, run_on, running_stack
from gkt_tools.stack import Stack


def real_scenarios(args: argparse.Namespace, chosen: list[str], state: Path) -> dict[str, Any]:
    """The scenarios on the bundled models, sharing one stack; offline runs happen while it idles."""
    from gkt.evaluation.datasets import load_dataset

    dataset = load_dataset(task=Task.CSQA, data_dir=args.data_dir, limit=None)
    queries = [example.query for example in dataset.examples]
    env = {
        "GKT_TEACHER_TEMPERATURE": "0",
        "GKT_TEACHER_MAX_BATCH_SIZE": str(args.batch_size),
        "GKT_STUDENT_STREAM_INTERVAL_MS": str(args.stream_interval_ms),
        "GKT_LOG_LEVEL": "WARNING",
        "GKT_TORCH_THREADS": str(args.torch_threads),
    }
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.no_prefix_cache:
        env |= {"GKT_TEACHER_PREFIX_CACHE": "false", "GKT_STUDENT_PREFIX_CACHE": "false"}
    results: dict[str, Any] = {}
    with running_stack(state, env, students=1) as stack:
        for scenario in chosen:
            results[scenario] = _REAL[scenario](args, stack, queries)
    return results


def _batching(args: argparse.Namespace, stack: Stack, queries: list[str]) -> dict[str, Any]:
    """Guide jobs from twice as many clients as a batch holds, then the same batches offline."""
    from gkt.jobs import GuidanceMode
    from gkt.models import load_model
    from gkt.prompts import STOP_SEQUENCE, teacher_prompt
    from gkt.v1 import guidance_pb2 as pb
    from services.teacher.backends.base import GenerationRequest
    from services.teacher.backends.local import LocalBackend
    from services.teacher.settings import TeacherSettings

    size = args.batch_size
    chosen = queries[: size * args.batches]

    def request(index: int) -> Any:
        return pb.GuideRequest(
            query=chosen[index % len(chosen)],
            task=pb.TASK_CSQA,
            guidance=pb.GuidanceParams(
                mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=args.max_guidance_tokens
            ),
        )

    online = closed_loop_on(
        stack, request, concurrency=2 * size, requests=len(chosen), warmup=size, label="batching online"
    )
    settings = TeacherSettings()
    lm = load_model(name=settings.local_model, cache_dir=settings.model_cache_dir)
    requests = [
        GenerationRequest(
            prompt=teacher_prompt(task=Task.CSQA, mode=GuidanceMode.CUTOFF, query=query),
            max_guidance_tokens=args.max_guidance_tokens,
            stop=(STOP_SEQUENCE,),
        )
        for query in chosen
    ]
    batches = [requests[i : i + size] for i in range(0, len(requests), size)]

    def offline_rps(backend: LocalBackend, count: int, *, warm: bool) -> float:
        if warm:  # the prefix cache, the allocator
            backend.generate_sync(batches[0])
        started = time.perf_counter()
        for batch in batches[:count]:
            backend.generate_sync(batch)
        return sum(len(b) for b in batches[:count]) / (time.perf_counter() - started)

    print("batching: offline batched generate…")
    reuse = not args.no_prefix_cache
    offline = offline_rps(LocalBackend.from_loaded(lm, prefix_cache=reuse), len(batches), warm=True)
    without = offline_rps(LocalBackend.from_loaded(lm, prefix_cache=False), 2, warm=False) if reuse else None
    return {
        "batch_size": size,
        "online": online,
        "offline_rps": offline,
        "offline_no_prefix_rps": without,
        "prefix_speedup_offline": offline / without if without else None,
        "efficiency": online["throughput_rps"] / offline,
    }


def _student(args: argparse.Namespace, stack: Stack, queries: list[str]) -> dict[str, Any]:
    """Student-alone jobs one at a time, then `model.generate` of the same prompts and token counts."""
    from gkt.models import load_model
    from gkt.prompts import student_prompt
    from gkt.v1 import guidance_pb2 as pb
    from services.student.settings import StudentSettings

    chosen = queries[: args.student_jobs]

    def request(index: int) -> Any:
        return pb.GenerateRequest(
            query=chosen[index % len(chosen)],
            task=pb.TASK_CSQA,
            guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_NONE),
            sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=100, seed=0),
        )

    samples, _wall = run_on(
        stack, request, concurrency=1, requests=len(chosen), warmup=1, label="student jobs"
    )
    settings = StudentSettings()
    lm = load_model(name=settings.local_model, cache_dir=settings.model_cache_dir)
    model: Any = lm.model
    print("student: bare model.generate…")
    job_s = generate_s = 0.0
    tokens = 0
    for index, (query, sample) in enumerate(zip(chosen, samples, strict=True)):
        if not sample.ok or sample.tokens == 0:
            continue
        inputs = lm.tokenizer(student_prompt(task=Task.CSQA, query=query, guidance=""), return_tensors="pt")
        n = sample.tokens
        if index == 0:  # warm, uncounted
            model.generate(
                **inputs, max_new_tokens=2, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id
            )
        started = time.perf_counter()
        model.generate(
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
        generate_s += time.perf_counter() - started
        job_s += sample.stages_ms["student_ms"] / 1000
        tokens += n
    return {
        "jobs": len(chosen),
        "tokens": tokens,
        "student_s": job_s,
        "generate_s": generate_s,
        "ratio": job_s / generate_s if generate_s else float("nan"),
    }


def _gkt(args: argparse.Namespace, stack: Stack, queries: list[str]) -> dict[str, Any]:
    """The same questions three times through the gateway: student alone, teacher alone, GKT."""
    from gkt.v1 import guidance_pb2 as pb

    chosen = queries[: args.questions]
    runs = {
        "student_alone": pb.GuidanceParams(mode=pb.GUIDANCE_MODE_NONE),
        "teacher_alone": pb.GuidanceParams(mode=pb.GUIDANCE_MODE_FULL),
        "gkt": pb.GuidanceParams(mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=args.max_guidance_tokens),
    }
    results: dict[str, Any] = {
        "questions": len(chosen),
        "task": Task.CSQA.value,
        "concurrency": args.batch_size,
    }
    for name, guidance in runs.items():

        def request(index: int, guidance: Any = guidance) -> Any:
            return pb.GenerateRequest(
                query=chosen[index % len(chosen)],
                task=pb.TASK_CSQA,
                guidance=guidance,
                sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=100, seed=0),
            )

        results[name] = closed_loop_on(
            stack, request, concurrency=args.batch_size, requests=len(chosen), warmup=0, label=f"gkt: {name}"
        )
    alone = results["student_alone"]["wall_s"]
    results["ratios"] = {name: results[name]["wall_s"] / alone for name in runs} | {
        "gkt_vs_teacher": results["gkt"]["wall_s"] / results["teacher_alone"]["wall_s"]
    }
    results["speed_up_vs_teacher"] = results["teacher_alone"]["wall_s"] / results["gkt"]["wall_s"]
    return results


_REAL = {"batching": _batching, "student": _student, "gkt": _gkt}
