"""Tracing: off by default and harmless without OpenTelemetry; on, spans join the job's trace."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from gkt import tracing
from gkt.jobs import Job

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="the `tracing` extra is not installed")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def test_tracing_is_off_by_default_and_then_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GKT_TRACING_ENABLED", raising=False)
    settings = tracing.TracingSettings()
    tracing.configure(settings, service="gateway")

    assert not settings.tracing_enabled
    assert not tracing.enabled()
    with tracing.rpc_span("gkt.v1.GuidanceService/Generate"):
        assert tracing.current_traceparent() == ""
    tracing.record_span("gkt.teacher.generate", traceparent="", start=1.0, end=2.0)


def test_off_it_needs_no_opentelemetry_and_on_it_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for module in list(sys.modules):
        if module.startswith("opentelemetry"):
            monkeypatch.setitem(sys.modules, module, None)  # as if the packages were not installed
    monkeypatch.setitem(sys.modules, "opentelemetry", None)

    tracing.configure(tracing.TracingSettings(tracing_enabled=False), service="teacher")
    with tracing.job_span("gkt.student.generate", traceparent=""):
        pass
    with pytest.raises(RuntimeError, match=r"pip install 'gkt-serve\[tracing\]'"):
        tracing.configure(tracing.TracingSettings(tracing_enabled=True), service="teacher")
    assert not tracing.enabled()


def test_stage_spans_are_children_of_the_rpc_span_in_one_trace(spans: InMemorySpanExporter) -> None:
    with tracing.rpc_span("gkt.v1.GuidanceService/Generate"):
        traceparent = tracing.current_traceparent()
    tracing.record_span("gkt.teacher.generate", traceparent=traceparent, start=10.0, end=10.5)
    with tracing.job_span("gkt.student.generate", traceparent=traceparent, attributes={"gkt.attempt": 1}):
        pass

    by_name = {span.name: span for span in spans.get_finished_spans()}
    root = by_name["gkt.v1.GuidanceService/Generate"]
    assert root.kind == SpanKind.SERVER
    assert root.parent is None
    assert traceparent.startswith(f"00-{root.context.trace_id:032x}-{root.context.span_id:016x}-")
    for name in ("gkt.teacher.generate", "gkt.student.generate"):
        child = by_name[name]
        assert child.context.trace_id == root.context.trace_id
        assert child.parent is not None and child.parent.span_id == root.context.span_id
    teacher = by_name["gkt.teacher.generate"]
    assert (teacher.start_time, teacher.end_time) == (10_000_000_000, 10_500_000_000)
    assert by_name["gkt.student.generate"].attributes == {"gkt.attempt": 1}


def test_a_clients_traceparent_is_continued(spans: InMemorySpanExporter) -> None:
    metadata = (("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"), ("x-other", "1"))
    with tracing.rpc_span("gkt.v1.GuidanceService/Guide", metadata=metadata):
        pass

    (root,) = spans.get_finished_spans()
    assert f"{root.context.trace_id:032x}" == CLIENT_TRACE
    assert root.parent is not None and f"{root.parent.span_id:016x}" == CLIENT_SPAN


def test_an_error_inside_a_job_span_marks_it_failed(spans: InMemorySpanExporter) -> None:
    with tracing.rpc_span("rpc"):
        traceparent = tracing.current_traceparent()
    with pytest.raises(ValueError), tracing.job_span("gkt.student.generate", traceparent=traceparent):
        raise ValueError("boom")

    failed = next(s for s in spans.get_finished_spans() if s.name == "gkt.student.generate")
    assert not failed.status.is_ok
    assert [event.name for event in failed.events] == ["exception"]


def test_a_job_carries_only_a_well_formed_traceparent() -> None:
    assert Job(query="q").traceparent == ""
    assert Job(query="q", traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01").traceparent
    with pytest.raises(ValidationError):
        Job(query="q", traceparent="00-not-a-trace")


def test_every_tracing_setting_is_documented() -> None:
    root = Path(__file__).parents[2]
    documented = (root / "README.md").read_text() + (root / "docs" / "observability.md").read_text()
    missing = [
        f"GKT_{name.upper()}"
        for name in tracing.TracingSettings.model_fields
        if f"`GKT_{name.upper()}`" not in documented
    ]
    assert not missing
