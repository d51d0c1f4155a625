"""Every service's /metrics, scraped over HTTP while real processes serve real requests.

The series must move by exactly what the replies report: requests, batches, tokens, and the
per-stage times each reply carries.
"""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from gkt.keys import Keys
from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.stack import Stack
from services.student.settings import StudentSettings
from tests.waiting import until

TIMEOUT = 60
SCRAPE_EVERY_S = 0.1
"""How often a wait scrapes /metrics again: series recorded after a reply was sent catch up within moments."""
KEYS = Keys("e2e")  # the tiny stack's prefix
Samples = list[tuple[str, dict[str, str], float]]


class Scrape:
    """One scrape of a group of processes' /metrics (students: every worker summed)."""

    def __init__(self, stack: Stack, prefix: str) -> None:
        ports = [port for name, port in stack.metrics_ports.items() if name.startswith(prefix)]
        assert ports, f"no metrics port for {prefix}: {stack.metrics_ports}"
        self.samples: Samples = []
        for port in ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
            for family in text_string_to_metric_families(text):
                self.samples += [(s.name, s.labels, s.value) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels`."""
        return sum(
            value
            for sample, sample_labels, value in self.samples
            if sample == name and labels.items() <= sample_labels.items()
        )


def _request(query: str, *, seed: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        query=query,
        task=pb.TASK_GSM8K,
        guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=5),
        sampling=pb.SamplingParams(temperature=0.7, max_new_tokens=10, seed=seed),
    )


def _idle(stack: Stack) -> bool:
    """No call in flight, and no job anywhere on its way: none waiting for or held by a teacher (the query
    stream), none sent to the students and not yet claimed, none claimed and not yet released (the job
    books of `gkt.leases`), no student busy. Read where it is kept, not from gauges sampled each second."""
    redis = Redis.from_url(stack.redis_url or "")
    try:
        on_its_way = (
            redis.xlen(KEYS.queries) + redis.hlen(KEYS.student_dispatched) + redis.hlen(KEYS.student_running)
        )
    finally:
        redis.close()
    busy = Scrape(stack, "student").value("gkt_student_busy_workers")
    return not (on_its_way or busy or Scrape(stack, "gateway").value("gkt_gateway_in_flight_requests"))


@pytest.fixture
def idle_stack(tiny_stack: Stack) -> Stack:
    """The stack once earlier tests' jobs (one whose client left early, say) have gone through."""
    until(lambda: _idle(tiny_stack), what="the stack to be idle", timeout_s=60, every_s=SCRAPE_EVERY_S)
    return tiny_stack


def test_series_move_by_what_the_replies_report(
    idle_stack: Stack, stub: guidance_pb2_grpc.GuidanceServiceStub
) -> None:
    before = {service: Scrape(idle_stack, service) for service in ("gateway", "teacher", "student")}
    requests = [_request(f"How many apples does box {i} hold?", seed=i) for i in range(5)]
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda r: stub.Generate(r, timeout=TIMEOUT), requests))
    n = len(replies)

    def delta(service: str, name: str, **labels: str) -> float:
        return Scrape(idle_stack, service).value(name, **labels) - before[service].value(name, **labels)

    # Every job of a batch is one of ours, so each batch contributes batch_size × 1/batch_size = 1.
    batches = round(sum(1 / r.timings.teacher_batch_size for r in replies))
    assert batches >= 1

    # gateway: N requests → +N, each timed; the RPC lasts at least the reply's total
    assert delta("gateway", "gkt_gateway_requests_total", rpc="Generate", code="OK") == n
    assert delta("gateway", "gkt_gateway_request_duration_seconds_count", rpc="Generate") == n
    rpc_seconds = delta("gateway", "gkt_gateway_request_duration_seconds_sum", rpc="Generate")
    assert rpc_seconds >= sum(r.timings.total_ms for r in replies) / 1000 - 0.01 * n

    # teacher: one batch observation per batch, one queue wait per job, tokens as replied
    assert delta("teacher", "gkt_teacher_batch_size_count") == batches
    assert delta("teacher", "gkt_teacher_batch_size_sum") == n
    assert delta("teacher", "gkt_teacher_generation_seconds_count") == batches
    assert delta("teacher", "gkt_teacher_queue_wait_seconds_count") == n
    assert delta("teacher", "gkt_teacher_guidance_tokens_total") == sum(
        r.usage.guidance_tokens for r in replies
    )
    assert delta("teacher", "gkt_teacher_jobs_total", outcome="dispatched") == n

    # student: tokens as replied, one observation per job in every per-job histogram
    assert delta("student", "gkt_student_generated_tokens_total") == sum(
        r.usage.completion_tokens for r in replies
    )
    for histogram in (
        "gkt_student_job_duration_seconds",
        "gkt_student_queue_wait_seconds",
        "gkt_student_time_to_first_token_seconds",
        "gkt_student_tokens_per_job",
        "gkt_student_tokens_per_second",
    ):
        assert delta("student", f"{histogram}_count") == n, histogram
    assert delta("student", "gkt_student_jobs_total", outcome="answered") == n

    # per-stage times: the histograms' sums are the replies' timings
    stage_sums = {
        ("teacher", "gkt_teacher_queue_wait_seconds_sum"): sum(r.timings.queue_wait_ms for r in replies),
        ("teacher", "gkt_teacher_generation_seconds_sum"): sum(
            r.timings.teacher_ms / r.timings.teacher_batch_size for r in replies
        ),
        ("student", "gkt_student_queue_wait_seconds_sum"): sum(r.timings.student_wait_ms for r in replies),
        ("student", "gkt_student_job_duration_seconds_sum"): sum(r.timings.student_ms for r in replies),
    }
    for (service, name), replied_ms in stage_sums.items():
        assert delta(service, name) == pytest.approx(replied_ms / 1000, abs=1e-6 * n), name

    # bounded labels: no job id ever becomes a label value
    job_ids = {r.job_id for r in replies}
    for service in ("gateway", "teacher", "student"):
        labels = {
            v for _, sample_labels, _ in Scrape(idle_stack, service).samples for v in sample_labels.values()
        }
        assert not labels & job_ids


def test_failed_and_streamed_calls_are_counted_by_status_code(
    idle_stack: Stack, stub: guidance_pb2_grpc.GuidanceServiceStub
) -> None:
    before = Scrape(idle_stack, "gateway")

    with pytest.raises(grpc.RpcError) as refused:
        stub.Generate(pb.GenerateRequest(query="   "), timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    events = list(stub.GenerateStream(_request("How many pears?", seed=3), timeout=TIMEOUT))
    assert events[-1].HasField("final")

    def delta(name: str, **labels: str) -> float:
        return Scrape(idle_stack, "gateway").value(name, **labels) - before.value(name, **labels)

    until(
        lambda: delta("gkt_gateway_requests_total", rpc="GenerateStream", code="OK") == 1,
        what="the stream's OK to be counted",
        timeout_s=15,
        every_s=SCRAPE_EVERY_S,
    )
    assert delta("gkt_gateway_requests_total", rpc="Generate", code="INVALID_ARGUMENT") == 1
    assert delta("gkt_gateway_requests_total", rpc="GenerateStream", code="OK") == 1
    assert delta("gkt_gateway_request_duration_seconds_count", rpc="GenerateStream") == 1
    assert Scrape(idle_stack, "gateway").value("gkt_gateway_in_flight_requests") == 0


def test_queue_gauges_and_worker_count_are_exported(idle_stack: Stack) -> None:
    names = {name for name, _, _ in Scrape(idle_stack, "gateway").samples}
    assert {"gkt_gateway_queue_depth", "gkt_gateway_oldest_job_age_seconds"} <= names
    # idle: nothing waits for a teacher, once the gateway's sampler (each second) has seen so
    until(
        lambda: Scrape(idle_stack, "gateway").value("gkt_gateway_queue_depth") == 0,
        what="the sampled queue depth of an idle stack to read 0",
        timeout_s=15,
        every_s=SCRAPE_EVERY_S,
    )
    # two student processes, each with GKT_STUDENT_MAX_BATCH batch slots
    slots = StudentSettings.model_fields["student_max_batch"].default
    until(
        lambda: Scrape(idle_stack, "student").value("gkt_student_workers") == 2 * slots,
        what=f"two students' {2 * slots} batch slots",
        timeout_s=15,
        every_s=SCRAPE_EVERY_S,
    )
