"""The dashboard and the alert rules: well-formed, complete, and naming only metrics the code declares.

A PromQL expression that names a metric gkt/metrics.py does not declare (a typo, a renamed metric)
shows nothing on a dashboard and never fires as an alert, silently: these tests make it loud.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from gkt import metrics

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "k8s" / "monitoring"
DASHBOARD = json.loads((MONITORING / "dashboard.json").read_text(encoding="utf-8"))
RULES = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text(encoding="utf-8"))

# PromQL's functions and aggregations, and the keywords that may stand between them.
FUNCTIONS = frozenset(
    [
        "abs",
        "absent",
        "absent_over_time",
        "avg",
        "avg_over_time",
        "bottomk",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "count",
        "count_over_time",
        "count_values",
        "day_of_month",
        "day_of_week",
        "delta",
        "deriv",
        "exp",
        "floor",
        "group",
        "histogram_quantile",
        "holt_winters",
        "increase",
        "irate",
        "label_join",
        "label_replace",
        "last_over_time",
        "ln",
        "log2",
        "log10",
        "max",
        "max_over_time",
        "min",
        "min_over_time",
        "predict_linear",
        "quantile",
        "quantile_over_time",
        "rate",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sort",
        "sort_desc",
        "sqrt",
        "stddev",
        "stdvar",
        "sum",
        "sum_over_time",
        "time",
        "timestamp",
        "topk",
        "vector",
    ]
)
KEYWORDS = frozenset(
    ["and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"]
)
GRAFANA_BUILTINS = ("$__rate_interval", "$__interval", "$__range")
STAGE_HISTOGRAMS = (
    "gkt_gateway_request_duration_seconds",
    "gkt_teacher_queue_wait_seconds",
    "gkt_teacher_generation_seconds",
    "gkt_student_queue_wait_seconds",
    "gkt_student_time_to_first_token_seconds",
    "gkt_student_job_duration_seconds",
)


def declared_series() -> set[str]:
    """Every series name a scrape of the services can show, from the metrics gkt/metrics.py declares."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: set[str] = set()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for family in metric.describe():
                names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects; raises ValueError on a function PromQL lacks."""
    if match := re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*\w+\s*\)\s*", expr):
        return {match.group(1)}
    for builtin in GRAFANA_BUILTINS:
        expr = expr.replace(builtin, "5m")
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", expr)  # label values, regexes
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    expr = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", " ", expr)  # numbers
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][\w:]*", expr):
        word, rest = match.group(), expr[match.end() :].lstrip()
        if word in KEYWORDS:
            continue
        if rest.startswith("("):
            if word not in FUNCTIONS:
                raise ValueError(f"{word}() is not a PromQL function in {expr!r}")
        else:
            names.add(word)
    return names


def dashboard_exprs() -> list[str]:
    exprs = [target["expr"] for panel in DASHBOARD["panels"] for target in panel.get("targets", [])]
    exprs += [
        variable["query"]["query"]
        for variable in DASHBOARD["templating"]["list"]
        if variable["type"] == "query"
    ]
    return exprs


def rules() -> list[dict[str, Any]]:
    return [rule for group in RULES["spec"]["groups"] for rule in group["rules"]]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'histogram_quantile(0.95, sum by (le, rpc) (rate(gkt_a_bucket{code=~"OK|X", ns="$ns"}[$__rate_interval])))',
            {"gkt_a_bucket"},
        ),
        ("max(gkt_q) > 10 and deriv(max(gkt_q)[15m:1m]) > 0", {"gkt_q"}),
        ("max(gkt_q) > 0 and (sum(rate(gkt_r_count[5m])) or vector(0)) == 0", {"gkt_q", "gkt_r_count"}),
        (
            "(sum(rate(gkt_b_count[5m])) or vector(0)) == 0 unless on (pod) gkt_c > 1e3",
            {"gkt_b_count", "gkt_c"},
        ),
        ("label_values(gkt_gateway_requests_total, namespace)", {"gkt_gateway_requests_total"}),
    ],
)
def test_metric_names_are_parsed_out_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_the_parser_refuses_what_promql_lacks() -> None:
    with pytest.raises(ValueError, match="percentile"):
        metric_names("percentile(0.9, gkt_a)")


def test_declared_series_follow_the_naming_rule() -> None:
    series = declared_series()
    assert "gkt_gateway_requests_total" in series
    assert "gkt_teacher_batch_size_bucket" in series
    assert "gkt_student_busy_workers" in series
    assert all(re.fullmatch(r"gkt_(gateway|teacher|student)_[a-z0-9_]+", name) for name in series)


@pytest.mark.parametrize(
    ("source", "exprs"),
    [("dashboard.json", dashboard_exprs()), ("prometheusrule.yaml", [str(r["expr"]) for r in rules()])],
)
def test_every_expression_names_only_declared_metrics(source: str, exprs: list[str]) -> None:
    declared = declared_series()
    assert exprs
    unknown = {name: expr for expr in exprs for name in metric_names(expr) if name not in declared}
    assert not unknown, f"{source} names metrics gkt/metrics.py does not declare: {unknown}"


def test_the_dashboard_is_well_formed() -> None:
    variables = {variable["name"] for variable in DASHBOARD["templating"]["list"]}
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert DASHBOARD["uid"] and DASHBOARD["title"] and isinstance(DASHBOARD["schemaVersion"], int)
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            used = set(re.findall(r"\$(\w+)", expr)) - {b.lstrip("$") for b in GRAFANA_BUILTINS}
            assert used <= variables, f"{panel['title']}: undefined variables {used - variables}"


def test_the_dashboard_shows_every_required_signal() -> None:
    exprs = "\n".join(dashboard_exprs())
    for histogram in STAGE_HISTOGRAMS:  # p50 / p95 / p99 latency of every stage
        for quantile in ("0.5", "0.95", "0.99"):
            assert re.search(rf"histogram_quantile\({quantile}, [^\n]*{histogram}_bucket", exprs), (
                histogram,
                quantile,
            )
    for required in (
        "gkt_gateway_requests_total",  # throughput and error rates
        "gkt_student_generated_tokens_total",  # token throughput
        "gkt_teacher_batch_size_bucket",  # teacher batch size
        "gkt_gateway_queue_depth",  # queue depth and age
        "gkt_gateway_student_queue_depth",
        "gkt_gateway_oldest_job_age_seconds",
        "sum(gkt_student_busy_workers",  # student utilisation: busy ÷ workers
        "sum(gkt_student_workers",
        "gkt_teacher_backend_errors_total",
    ):
        assert required in exprs, required


def test_the_rules_alert_on_queues_age_errors_and_missing_workers() -> None:
    by_name = {rule["alert"]: rule for rule in rules()}
    assert {
        "GktQueueGrowing",
        "GktOldestJobOverSlo",
        "GktErrorRatioHigh",
        "GktNoTeacherConsuming",
        "GktNoStudentAlive",
    } <= set(by_name)
    assert "gkt_gateway_oldest_job_age_seconds" in by_name["GktOldestJobOverSlo"]["expr"]
    assert "gkt_teacher_batch_size_count" in by_name["GktNoTeacherConsuming"]["expr"]
    assert "gkt_student_workers" in by_name["GktNoStudentAlive"]["expr"]
    for rule in by_name.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_docs_point_to_the_dashboard_and_the_rules() -> None:
    kubernetes = (REPO / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    observability = (REPO / "docs" / "observability.md").read_text(encoding="utf-8")
    for doc in (kubernetes, observability):
        assert "k8s/monitoring/dashboard.json" in doc
        assert "k8s/monitoring/prometheusrule.yaml" in doc
    for rule in rules():
        assert rule["alert"] in observability


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the kustomization")
def test_the_monitoring_kustomization_ships_this_dashboard_and_these_rules() -> None:
    output = subprocess.run(
        ["kubectl", "kustomize", str(MONITORING)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    objects = {(obj["kind"], obj["metadata"]["name"]): obj for obj in yaml.safe_load_all(output) if obj}

    dashboard = objects[("ConfigMap", "gkt-serve-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["gkt-serve.json"]) == DASHBOARD
    assert objects[("PrometheusRule", "gkt-serve")]["spec"] == RULES["spec"]


def test_every_declared_metric_is_documented() -> None:
    observability = (REPO / "docs" / "observability.md").read_text(encoding="utf-8")
    undocumented = [
        family.name + ("_total" if family.type == "counter" else "")
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
        for family in metric.describe()
        if f"`{family.name}{'_total' if family.type == 'counter' else ''}`" not in observability
    ]
    assert not undocumented
