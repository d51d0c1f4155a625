"""One job, one trace: gateway → teacher → student in one process, real Redis, real gRPC, tiny models."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gkt.engine import Engine
from gkt.jobs import Guidance, Job
from gkt.keys import Keys
from gkt.models import LoadedModel, load_model
from gkt.publisher import SyncEventPublisher
from gkt.queue import ensure_group
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import free_port
from services.gateway.server import Gateway
from services.gateway.settings import GatewaySettings
from services.student.backends.local import LocalStudentBackend
from services.student.completion import JobLimits, run_job
from services.student.jobbook import JobBook
from services.teacher.backends.local import LocalBackend
from services.teacher.batching import collect_batch
from services.teacher.settings import TeacherSettings
from services.teacher.worker import TeacherWorker

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="the `tracing` extra is not installed")
from opentelemetry.sdk.trace import ReadableSpan  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

KEYS = Keys("trace")
STAGES = ("gkt.teacher.queue_wait", "gkt.teacher.generate", "gkt.student.queue_wait", "gkt.student.generate")


@pytest.fixture(scope="module")
def models(
    tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[LocalBackend, LoadedModel]:
    cache = tmp_path_factory.mktemp("c")
    teacher = LocalBackend.from_loaded(load_model(name=str(tiny_models[0]), cache_dir=cache))
    return teacher, load_model(name=str(tiny_models[1]), cache_dir=cache)


@pytest.fixture
async def gateway(redis_url: str, redis: Redis) -> AsyncIterator[Gateway]:
    settings = GatewaySettings(
        redis_url=redis_url,
        key_prefix=KEYS.prefix,
        gateway_addr=f"127.0.0.1:{free_port()}",
        gateway_metrics_port=0,
        gateway_grace_s=0,
    )
    server = Gateway(settings)
    await server.start()
    yield server
    await server.stop()


async def test_one_jobs_spans_share_one_trace_under_the_gateways_span(
    spans: InMemorySpanExporter, gateway: Gateway, models: tuple[LocalBackend, LoadedModel], redis_url: str
) -> None:
    backend, student = models
    aredis = AsyncRedis.from_url(redis_url)
    await ensure_group(aredis, keys=KEYS)
    dispatched: list[tuple[Job, Guidance]] = []
    teacher = TeacherWorker(
        settings=TeacherSettings(redis_url=redis_url, key_prefix=KEYS.prefix, teacher_temperature=0),
        redis=aredis,
        backend=backend,
        dispatch=lambda job, guidance, queue: dispatched.append((job, guidance)),
    )
    request = pb.GenerateRequest(
        query="How many trees?",
        guidance=pb.GuidanceParams(max_guidance_tokens=4),
        sampling=pb.SamplingParams(temperature=0, max_new_tokens=6),
    )
    async with grpc.aio.insecure_channel(gateway.settings.gateway_addr) as channel:
        call = asyncio.ensure_future(
            guidance_pb2_grpc.GuidanceServiceStub(channel).Generate(request, timeout=60)
        )
        # the teacher's steps, then the student's, as their workers would run them
        batch, _ = await collect_batch(
            aredis, keys=KEYS, consumer="t1", max_batch_size=4, max_wait_ms=50, block_ms=5000
        )
        await teacher.process(batch)
        ((job, guidance),) = dispatched
        sync_redis = Redis.from_url(redis_url)
        publisher = SyncEventPublisher(sync_redis, keys=KEYS, ttl_s=600)
        book = JobBook(sync_redis, keys=KEYS, owner="s1", lease_s=10, ttl_s=600)
        engine = Engine(student)
        engine.start()
        try:
            await asyncio.to_thread(
                lambda: run_job(
                    backend=LocalStudentBackend(engine),
                    job=job,
                    guidance=guidance,
                    publisher=publisher,
                    book=book,
                    limits=JobLimits(max_attempts=3, time_limit_s=60),
                )
            )
        finally:
            engine.stop()
        reply = await call
    await aredis.aclose()

    assert reply.job_id == job.id
    finished = {span.name: span for span in spans.get_finished_spans()}
    assert set(finished) == {"gkt.v1.GuidanceService/Generate", *STAGES}
    root = finished["gkt.v1.GuidanceService/Generate"]
    assert root.parent is None
    assert job.traceparent.startswith(f"00-{root.context.trace_id:032x}-{root.context.span_id:016x}-")
    for stage in STAGES:
        span = finished[stage]
        assert span.context.trace_id == root.context.trace_id, stage
        assert span.parent is not None and span.parent.span_id == root.context.span_id, stage
        (root_start, root_end), (start, end) = _times(root), _times(span)
        assert root_start <= start <= end <= root_end, stage
    assert finished["gkt.teacher.generate"].attributes == {
        "gkt.batch_size": 1,
        "gkt.guidance_tokens": reply.usage.guidance_tokens,
    }


def _times(span: ReadableSpan) -> tuple[int, int]:
    assert span.start_time is not None and span.end_time is not None
    return span.start_time, span.end_time
