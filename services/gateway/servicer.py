"""The gRPC servicer (thin): protobuf in, domain call, protobuf out."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import grpc

from gkt.errors import JobFailed, StatusCode
from gkt.jobs import DeltaEvent, FinalEvent, GuidanceEvent, GuidanceMode, Job, JobKind
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from services.gateway import convert, tenancy
from services.gateway.service import GatewayService
from services.gateway.settings import GatewaySettings


class GuidanceServicer(guidance_pb2_grpc.GuidanceServiceServicer):
    def __init__(self, *, service: GatewayService, settings: GatewaySettings) -> None:
        self.service = service
        self.settings = settings

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        job = convert.to_job(
            request, kind=JobKind.GENERATE, settings=self.settings, timeout_s=context.time_remaining()
        )
        async for accepted, event in self.service.run(job, tenant=tenancy.current()):
            if isinstance(event, FinalEvent):
                return convert.generate_response(
                    accepted, event.completion, now=time.time(), degraded=_degraded(job, accepted)
                )
        raise JobFailed(StatusCode.INTERNAL, "the job ended without an answer")

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        job = convert.to_job(
            request, kind=JobKind.GENERATE, settings=self.settings, timeout_s=context.time_remaining()
        )
        # closed here, in the call's own task, when the call ends early (its job is then cancelled)
        async with contextlib.aclosing(self.service.run(job, tenant=tenancy.current())) as events:
            async for accepted, event in events:
                if isinstance(event, GuidanceEvent):
                    yield pb.GenerateStreamResponse(guidance=convert.guidance_update(event.guidance))
                elif isinstance(event, DeltaEvent):
                    yield pb.GenerateStreamResponse(delta=pb.TextDelta(text=event.text))
                elif isinstance(event, FinalEvent):
                    yield pb.GenerateStreamResponse(
                        final=convert.generate_response(
                            accepted, event.completion, now=time.time(), degraded=_degraded(job, accepted)
                        )
                    )

    async def Guide(self, request: pb.GuideRequest, context: grpc.aio.ServicerContext) -> pb.GuideResponse:
        job = convert.to_job(
            request, kind=JobKind.GUIDE, settings=self.settings, timeout_s=context.time_remaining()
        )
        async for accepted, event in self.service.run(job, tenant=tenancy.current()):
            if isinstance(event, FinalEvent):
                return convert.guide_response(accepted, event.completion.guidance, now=time.time())
        raise JobFailed(StatusCode.INTERNAL, "the job ended without guidance")


def _degraded(requested: Job, accepted: Job) -> bool:
    """The gateway answered student-only although the request asked for guidance."""
    return accepted.guidance.mode == GuidanceMode.NONE != requested.guidance.mode
