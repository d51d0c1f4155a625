"""OpenTelemetry tracing, off by default: one trace per job, its context carried in `Job.traceparent`.

The gateway's RPC span is the root; the teacher and the student add child spans to it from the
W3C traceparent the job carries through Redis and Celery. With tracing off (the default) nothing
here imports OpenTelemetry, so the services run without the `tracing` extra installed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

Attributes = Mapping[str, str | int | float | bool]
_tracer: Any = None  # an opentelemetry Tracer once install() ran; None: tracing is off


class TracingSettings(BaseSettings):
    """`GKT_TRACING_*`: whether and where every service sends its spans."""

    model_config = SettingsConfigDict(env_prefix="GKT_", extra="ignore", frozen=True)

    tracing_enabled: bool = Field(
        default=False, description="Send OpenTelemetry spans (needs the `tracing` extra installed)."
    )
    tracing_exporter: Literal["otlp", "console"] = Field(
        default="otlp", description="otlp: OTLP over HTTP to the endpoint; console: spans printed to stdout."
    )
    tracing_endpoint: str = Field(
        default="",
        description="OTLP/HTTP traces URL (e.g. http://otel-collector:4318/v1/traces); empty: "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or the exporter's default.",
    )
    tracing_sample_ratio: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Share of new traces kept; jobs follow their root's choice."
    )


def configure(settings: TracingSettings, *, service: str) -> None:
    """Set up tracing for one service as `settings` say; a no-op when tracing is off."""
    if not settings.tracing_enabled:
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise RuntimeError(
            "GKT_TRACING_ENABLED=true needs the OpenTelemetry packages: pip install 'gkt-serve[tracing]'"
        ) from exc
    exporter: SpanExporter
    if settings.tracing_exporter == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.tracing_endpoint or None)
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"gkt-{service}"}),
        sampler=ParentBased(TraceIdRatioBased(settings.tracing_sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    log.info(
        "tracing on", extra={"exporter": settings.tracing_exporter, "endpoint": settings.tracing_endpoint}
    )


def install(provider: Any) -> None:
    """Trace with this TracerProvider (None: tracing off). configure() builds one; tests pass their own."""
    global _tracer
    _tracer = provider.get_tracer("gkt") if provider is not None else None


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def rpc_span(name: str, *, metadata: Sequence[tuple[str, Any]] | None = None) -> Iterator[None]:
    """A server span around one RPC, current inside the block; continues a client's traceparent if sent."""
    if _tracer is None:
        yield
        return
    from opentelemetry.trace import SpanKind

    parent = _extract({key: value for key, value in metadata or () if isinstance(value, str)})
    with _tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER):
        yield


def current_traceparent() -> str:
    """The W3C traceparent of the current span, to store in a job; empty when there is no trace."""
    if _tracer is None:
        return ""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent", "")


@contextlib.contextmanager
def job_span(name: str, *, traceparent: str, attributes: Attributes | None = None) -> Iterator[None]:
    """A span in the job's trace around the block (errors raised inside are recorded on it)."""
    if _tracer is None or not traceparent:
        yield
        return
    with _tracer.start_as_current_span(
        name, context=_extract({"traceparent": traceparent}), attributes=dict(attributes or {})
    ):
        yield


def record_span(
    name: str, *, traceparent: str, start: float, end: float, attributes: Attributes | None = None
) -> None:
    """A finished span in the job's trace, for a stage whose times (epoch seconds) are already known."""
    if _tracer is None or not traceparent or not start:
        return
    span = _tracer.start_span(
        name,
        context=_extract({"traceparent": traceparent}),
        start_time=int(start * 1e9),
        attributes=dict(attributes or {}),
    )
    span.end(end_time=int(max(start, end) * 1e9))


def _extract(carrier: dict[str, str]) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carrier)
