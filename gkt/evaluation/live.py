"""The live runner: every question goes through a running gateway over gRPC, with bounded concurrency.

This times the real system — queueing, the teacher's dynamic batches, Celery students — so a row's time
is the wall time its chunks took, shared out over their examples. The server decides what a request
cannot: the exemplar set and the teacher's sampling (GKT_TEACHER_TEMPERATURE / _TOP_P).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from gkt.client import GatewayConnection
from gkt.evaluation.datasets import Example
from gkt.evaluation.plan import Condition, EvalPlan
from gkt.evaluation.records import ExampleRecord
from gkt.evaluation.scoring import score_example


class LiveRunner:
    """Sends a chunk's requests at most `concurrency` at a time; `run_chunk` waits for all replies."""

    def __init__(
        self, *, plan: EvalPlan, connection: GatewayConnection, concurrency: int, timeout_s: float
    ) -> None:
        from gkt.v1 import guidance_pb2_grpc

        self.plan = plan
        self._channel = connection.open()
        self._stub = guidance_pb2_grpc.GuidanceServiceStub(self._channel)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="gkt-eval")
        self._timeout_s = timeout_s
        self._metadata = connection.metadata

    def run_chunk(self, condition: Condition, examples: Sequence[Example]) -> list[ExampleRecord]:
        """Records of the answered examples; a failed request is reported and left for a rerun to retry."""
        started = time.perf_counter()
        replies = list(self._pool.map(lambda e: self._ask(condition, e), examples))
        share = (time.perf_counter() - started) / len(examples)
        records = []
        for example, reply in zip(examples, replies, strict=True):
            if isinstance(reply, grpc.RpcError):
                print(
                    f"{condition.name} example {example.index}: {reply.code().name}: {reply.details()}",
                    file=sys.stderr,
                )
                continue
            records.append(self._record(condition, example, reply, share))
        return records

    def reachable(self, *, timeout_s: float = 10.0) -> bool:
        """Whether the gateway accepts a connection (before thousands of requests fail one by one)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            return False
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._channel.close()

    def _ask(self, condition: Condition, example: Example) -> Any:
        from gkt.v1 import guidance_pb2 as pb

        guidance = pb.GuidanceParams(
            mode=pb.GuidanceMode.Value(f"GUIDANCE_MODE_{condition.mode.value.upper()}"),
            max_guidance_tokens=condition.max_guidance_tokens or None,
        )
        request = pb.GenerateRequest(
            query=example.query,
            task=pb.Task.Value(f"TASK_{self.plan.task.value.upper()}"),
            guidance=guidance,
            sampling=pb.SamplingParams(
                temperature=self.plan.student_temperature,
                top_p=self.plan.student_top_p,
                max_new_tokens=self.plan.student_tokens,
                seed=self.plan.example_seed(example.index),
            ),
        )
        try:
            return self._stub.Generate(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            return exc

    def _record(self, condition: Condition, example: Example, reply: Any, share: float) -> ExampleRecord:
        timings = reply.timings
        batch = max(1, timings.teacher_batch_size)
        return score_example(
            task=self.plan.task,
            condition=condition,
            example=example,
            seed=int(reply.seed),
            guidance=reply.guidance,
            guidance_tokens=reply.usage.guidance_tokens,
            student_text=reply.text[len(reply.guidance) :],
            student_tokens=reply.usage.completion_tokens,
            teacher_seconds=timings.teacher_ms / 1000 / batch,
            student_seconds=timings.student_ms / 1000,
            seconds=share,
            teacher_batch_size=timings.teacher_batch_size,
            latency_seconds=timings.total_ms / 1000,
        )
