"""The dashboard and the alerts against a real Prometheus scraping a live stack under load.

One stack (private Redis, teacher, two Celery students, gateway) on the zero-cost echo backends, each
process serving /metrics on a free port; one `prometheus` (Debian's package) scraping them every second
and evaluating the shipped alert rules, with every `for:` shortened to seconds by `scripts/monitor.py
rules --for`. The benchmark's closed-loop load generator sends a mix of calls throughout. Then:
every panel query of k8s/monitoring/dashboard.json returns sane data; SIGKILLing every student fires
GktNoStudentAlive and restarting them resolves it; killing Redis fires GktErrorRatioHigh. Most of the
module is the fixtures that run Prometheus and the load, which the three tests share.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.bench.load import closed_loop, grpc_call
from gkt_tools.bench.stats import Sample
from gkt_tools.processes import free_port
from gkt_tools.stack import Stack

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((REPO / "k8s" / "monitoring" / "dashboard.json").read_text(encoding="utf-8"))
NAMESPACE = "gkt-e2e"
RATE_INTERVAL = "20s"  # what Grafana's $__rate_interval stands for in these queries
STUDENTS = 2
STUDENT_SLOTS = 4
TEACHER_MAX_BATCH = 8
ENV = {
    "GKT_TEACHER_BACKEND": "echo-benchmark-only",
    "GKT_TEACHER_MODEL": "echo-benchmark-only",
    "GKT_STUDENT_MODEL": "echo-benchmark-only",
    "GKT_TEACHER_MAX_BATCH_SIZE": str(TEACHER_MAX_BATCH),
    # the pipelined teacher's batch size is the jobs it has in flight: the same bound
    "GKT_TEACHER_MAX_IN_FLIGHT": str(TEACHER_MAX_BATCH),
    "GKT_TEACHER_MAX_WAIT_MS": "50",
    "GKT_STUDENT_MAX_BATCH": str(STUDENT_SLOTS),
    "GKT_STUDENT_WARMUP": "false",
    "GKT_KEY_PREFIX": "prom",
    "GKT_LOG_LEVEL": "WARNING",
    # Two calls at once at most: the load's third and fourth clients meet real rejections.
    "GKT_GATEWAY_KEY_MAX_CONCURRENT": "2",
}
CONCURRENCY = 4
PAUSE_S = 0.05
"""Each client's pause between calls (longer after a failure), so the load stays light on a small machine."""


# The sane value of each panel query: (panel title, refId) → a check on every value it returns.
def _rate(values: list[float]) -> bool:
    return all(v >= 0 for v in values) and any(v > 0 for v in values)


def _rare(values: list[float]) -> bool:
    return all(v >= 0 for v in values)


def _ratio(values: list[float]) -> bool:
    return all(0 <= v <= 1 for v in values)


def _latency(values: list[float]) -> bool:
    return all(0.001 <= v <= 60 for v in values)


def _teacher_batch(values: list[float]) -> bool:
    return all(1 <= v <= TEACHER_MAX_BATCH for v in values)


def _student_batch(values: list[float]) -> bool:
    return all(1 <= v <= STUDENT_SLOTS for v in values)


def _slots(values: list[float]) -> bool:
    return values == [STUDENTS * STUDENT_SLOTS]


def _busy(values: list[float]) -> bool:
    return all(0 <= v <= STUDENTS * STUDENT_SLOTS for v in values)


def _age(values: list[float]) -> bool:
    return all(0 <= v <= 60 for v in values)


def _at_least_one(values: list[float]) -> bool:
    return all(v >= 1 for v in values)


LATENCY_PANELS = (
    "Gateway: whole RPC",
    "Queue wait for a teacher",
    "Teacher generation",
    "Student wait",
    "Student time to first token",
    "Student generation per job",
)
SANE: dict[tuple[str, str], Callable[[list[float]], bool]] = {
    ("Requests per second by RPC", "A"): _rate,
    ("Errors per second by status code", "A"): _rate,  # the load sends invalid calls
    ("Errors per second by status code", "B"): _rate,  # and meets the concurrency limit
    ("Error ratio", "A"): _ratio,
    ("Error ratio", "B"): _ratio,
    ("Error ratio", "C"): _ratio,
    ("Tokens per second", "A"): _rate,
    ("Tokens per second", "B"): _rate,
    ("In-flight requests", "A"): _busy,
    ("Backend errors, dead letters, reclaimed and taken-over jobs", "A"): _rare,
    ("Backend errors, dead letters, reclaimed and taken-over jobs", "B"): _rare,
    ("Backend errors, dead letters, reclaimed and taken-over jobs", "C"): _rare,
    ("Backend errors, dead letters, reclaimed and taken-over jobs", "D"): _rare,
    **{(title, ref): _latency for title in LATENCY_PANELS for ref in "ABC"},
    ("Batch size", "A"): _teacher_batch,
    ("Batch size", "B"): _teacher_batch,
    ("Batch size", "C"): _teacher_batch,
    ("Batch fill wait", "A"): _latency,
    ("Batch fill wait", "B"): _latency,
    ("Batch fill wait", "C"): _latency,
    ("Batches per second", "A"): _rate,
    ("Queue depth", "A"): _rare,
    ("Queue depth", "B"): _rare,
    ("Oldest job age", "A"): _age,
    ("Jobs by outcome", "A"): _rate,
    ("Jobs by outcome", "B"): _rate,
    ("Student utilisation", "A"): _ratio,
    ("Student batch slots", "A"): _slots,
    ("Student batch slots", "B"): _busy,
    ("Student tokens per second per job", "A"): _rate,
    ("Student tokens per second per job", "B"): _rate,
    ("Student tokens per second per job", "C"): _at_least_one,
    ("Student batch rows per engine step", "A"): _student_batch,
    ("Student batch rows per engine step", "B"): _student_batch,
    ("Student batch rows per engine step", "C"): _student_batch,
}


class Prometheus:
    """A `prometheus` process on a free port, and the parts of its HTTP API the tests read."""

    def __init__(self, *, workdir: Path, targets: dict[str, int]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed: run `make setup` (scripts/ensure-prometheus.sh)")
        rules = workdir / "rules.yaml"
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "monitor.py"), "rules", str(rules), "--for", "3s"],
            check=True,
            timeout=60,
        )
        jobs: dict[str, list[str]] = {}
        for name, port in targets.items():
            jobs.setdefault(name.split("-")[0], []).append(f"127.0.0.1:{port}")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": t, "labels": {"namespace": NAMESPACE}}]}
                for job, t in jobs.items()
            ],
        }
        (workdir / "prometheus.yaml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yaml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            _until(self._ready, timeout_s=30, what="prometheus ready")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.get("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == name]

    def firing(self) -> list[str]:
        return sorted(
            a["labels"]["alertname"] for a in self.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"
        )

    def _ready(self) -> bool:
        assert self.process.poll() is None, "prometheus exited"
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
            return bool(reply.status == 200)


class _Stopped(Exception):
    pass


class Load(threading.Thread):
    """The benchmark's closed loop, run until stopped: Generate, GenerateStream and Guide calls, and one
    call in ten with an empty query (INVALID_ARGUMENT); it counts what the clients saw."""

    def __init__(self, addr: str) -> None:
        super().__init__(daemon=True)
        self.addr = addr
        self.outcomes: Counter[str] = Counter()
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)

    def run(self) -> None:
        asyncio.run(self._load())

    async def _load(self) -> None:
        async with grpc.aio.insecure_channel(self.addr) as channel:
            stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
            calls = {
                "generate": grpc_call(stub, _generate, stream=False, timeout_s=60),
                "stream": grpc_call(stub, _generate, stream=True, timeout_s=60),
                "guide": grpc_call(stub, _guide, stream=False, timeout_s=60),
                "invalid": grpc_call(
                    stub, lambda i: pb.GenerateRequest(query=""), stream=False, timeout_s=60
                ),
            }
            mix = ["generate"] * 5 + ["stream"] * 3 + ["guide", "invalid"]

            async def call(index: int) -> Sample:
                if self.stopping.is_set():
                    raise _Stopped
                sample = await calls[mix[index % len(mix)]](index)
                self.outcomes[sample.error or "OK"] += 1
                await asyncio.sleep(PAUSE_S if sample.ok else 5 * PAUSE_S)
                return sample

            with contextlib.suppress(_Stopped):
                await closed_loop(call, concurrency=CONCURRENCY, requests=sys.maxsize)


def _generate(index: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        query=f"How many requests came before request {index}?",
        task=pb.TASK_FREEFORM,
        guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_CUTOFF, max_guidance_tokens=4),
        sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=16, seed=1),
    )


def _guide(index: int) -> pb.GuideRequest:
    return pb.GuideRequest(
        query=f"Give a hint for request {index}.",
        task=pb.TASK_FREEFORM,
        guidance=pb.GuidanceParams(mode=pb.GUIDANCE_MODE_HINT, max_guidance_tokens=4),
    )


def _values(prometheus: Prometheus, expr: str) -> list[float]:
    return [float(series["value"][1]) for series in prometheus.query(expr)]


def _until(check: Callable[[], object], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        last: Exception | None = None
        try:
            if check():
                return
        except Exception as exc:  # not up yet
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last!r})"
            )
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        state_dir=tmp_path_factory.mktemp("prometheus-stack"),
        env=ENV,
        students=STUDENTS,
        gateway_addr=f"127.0.0.1:{free_port()}",
        free_metrics_ports=True,
    )
    stack.start(timeout_s=180)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    prometheus = Prometheus(workdir=tmp_path_factory.mktemp("prometheus"), targets=stack.metrics_ports)

    def all_up() -> bool:
        targets = prometheus.get("/api/v1/targets")["activeTargets"]
        return len(targets) == len(stack.metrics_ports) and all(t["health"] == "up" for t in targets)

    _until(all_up, timeout_s=30, what="every /metrics target scraped")
    yield prometheus
    prometheus.stop()


@pytest.fixture(scope="module")
def load(stack: Stack, prometheus: Prometheus) -> Iterator[Load]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TQDM_DISABLE", "1")  # the load runs for minutes: no progress bar in the test output
        load = Load(stack.gateway_addr or "")
        load.start()
        _until(lambda: load.outcomes["OK"] >= 20, timeout_s=60, what="the load's first answers")
        yield load
        load.stop()


def panel_queries() -> dict[tuple[str, str], str]:
    """Every panel query of the dashboard, as Grafana would send it for our namespace."""
    return {
        (panel["title"], target["refId"]): target["expr"]
        .replace("$namespace", NAMESPACE)
        .replace("$__rate_interval", RATE_INTERVAL)
        for panel in DASHBOARD["panels"]
        for target in panel.get("targets", [])
    }


def test_every_panel_query_returns_sane_data_under_load(prometheus: Prometheus, load: Load) -> None:
    queries = panel_queries()
    assert set(queries) == set(SANE), "every panel query needs a sane-value check here"
    problems: dict[tuple[str, str], str] = {}

    def all_sane() -> bool:
        problems.clear()
        for key, expr in queries.items():
            values = _values(prometheus, expr)
            if not values:
                problems[key] = "no series"
            elif any(math.isnan(v) for v in values) or not SANE[key](values):
                problems[key] = f"values {values}"
        return not problems

    try:
        _until(all_sane, timeout_s=90, what="every panel query to return sane data")
    except AssertionError:
        pytest.fail(f"panel queries without sane data: {problems}\nload so far: {dict(load.outcomes)}")
    namespaces = prometheus.get("/api/v1/label/namespace/values", **{"match[]": "gkt_gateway_requests_total"})
    assert namespaces == [NAMESPACE]  # the dashboard's $namespace variable
    assert prometheus.firing() == [], "a healthy stack under load pages nobody"


def test_killing_every_student_fires_an_alert_and_restarting_them_resolves_it(
    stack: Stack, prometheus: Prometheus, load: Load
) -> None:
    assert not prometheus.alerts("GktNoStudentAlive")
    assert _values(prometheus, "sum(gkt_student_workers)") == [STUDENTS * STUDENT_SLOTS]
    students = [name for name in stack.processes if name.startswith("student-")]
    assert len(students) == STUDENTS
    for name in students:
        stack.kill(name)  # SIGKILL to the student's process group: its restarting parent dies too

    def fired() -> list[dict[str, Any]]:
        return [a for a in prometheus.alerts("GktNoStudentAlive") if a["state"] == "firing"]

    _until(fired, timeout_s=90, what="GktNoStudentAlive to fire")
    alert = fired()[0]
    assert alert["labels"]["severity"] == "critical"
    waiting = float(alert["value"])
    assert waiting >= 1
    assert alert["annotations"]["summary"] == f"{waiting:g} student tasks wait and no student worker is alive"

    answered = load.outcomes["OK"]
    for name in students:
        stack.restart(name)
    _until(lambda: not prometheus.alerts("GktNoStudentAlive"), timeout_s=120, what="the alert to resolve")
    _until(
        lambda: _values(prometheus, "sum(gkt_student_workers)") == [STUDENTS * STUDENT_SLOTS],
        timeout_s=30,
        what="every student's batch slots back in Prometheus",
    )
    _until(lambda: load.outcomes["OK"] > answered + 10, timeout_s=60, what="answers again")


def test_redis_down_fires_the_error_ratio_alert(stack: Stack, prometheus: Prometheus, load: Load) -> None:
    assert not prometheus.alerts("GktErrorRatioHigh")
    stack.kill("redis")

    def fired() -> list[dict[str, Any]]:
        return [a for a in prometheus.alerts("GktErrorRatioHigh") if a["state"] == "firing"]

    _until(fired, timeout_s=90, what="GktErrorRatioHigh to fire")
    assert fired()[0]["labels"]["severity"] == "critical"
    assert load.outcomes["UNAVAILABLE"] > 0
