"""What each rendered overlay lets a pod reach, and how the production pods get their secrets and limits.

The NetworkPolicies are evaluated the way Kubernetes combines them: a pod selected by any policy of a
direction may only make the connections that some rule of those policies allows.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not installed: the overlays are rendered with `kubectl kustomize` (kustomize v5)",
)

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "prod", "prod-tgi-hpa", "prod-servers")
PROD = ("prod", "prod-tgi-hpa", "prod-servers")
GKT = {"gateway": "gkt-gateway", "teacher": "gkt-teacher", "student": "gkt-student"}


def _render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    directory = REPO / "k8s" / "overlays" / overlay
    output = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", "this test reads only `In` expressions"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _egress(objects: list[dict[str, Any]], app: str) -> set[tuple[str, int]]:
    """(peer, port) pairs pod `app` may connect to; a peer is an app name, `dns` or `anywhere`."""
    labels = {"app.kubernetes.io/name": app}
    policies = [
        o["spec"]
        for o in objects
        if o["kind"] == "NetworkPolicy"
        and "Egress" in o["spec"].get("policyTypes", [])
        and _selects(o["spec"]["podSelector"], labels)
    ]
    assert policies, f"no egress policy selects {app}: its egress would be open"
    allowed: set[tuple[str, int]] = set()
    for policy in policies:
        for rule in policy.get("egress", []):
            assert rule.get("ports"), f"an egress rule for {app} allows every port"
            peers = [_peer(peer) for peer in rule.get("to", [])] or ["anywhere"]
            allowed |= {(peer, port["port"]) for peer in peers for port in rule["ports"]}
    return allowed


def _peer(peer: dict[str, Any]) -> str:
    if peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == (
        "kube-system"
    ) and peer.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"}:
        return "dns"
    assert "namespaceSelector" not in peer and "ipBlock" not in peer, f"unexpected egress peer {peer}"
    return str(peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"])


DNS = {("dns", 53)}
IN_CLUSTER_REDIS = {("redis", 6379)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_pod_may_reach_only_what_it_needs(overlay: str) -> None:
    objects = _render(overlay)
    redis = IN_CLUSTER_REDIS | (
        {("anywhere", 6379), ("anywhere", 6380)} if overlay == "prod-tgi-hpa" else set()
    )
    assert _egress(objects, "gkt-gateway") == DNS | redis
    student_server = {("student-server", 8000)} if overlay == "prod-servers" else set()
    assert _egress(objects, "gkt-student") == DNS | redis | student_server
    server = {("teacher-server", 8000)} if overlay in PROD else set()
    assert _egress(objects, "gkt-teacher") == DNS | redis | server
    if overlay in PROD:
        assert _egress(objects, "teacher-server") == DNS | {("anywhere", 443)}  # the model hub
    if overlay == "prod-servers":
        assert _egress(objects, "student-server") == DNS | {("anywhere", 443)}
    if overlay != "prod-tgi-hpa":  # its Redis is outside the cluster
        assert _egress(objects, "redis") == DNS


@pytest.mark.parametrize(
    ("overlay", "server"), [*((o, "teacher-server") for o in PROD), ("prod-servers", "student-server")]
)
def test_monitoring_scrapes_an_inference_server_through_its_metrics_proxy_only(
    overlay: str, server: str
) -> None:
    objects = _render(overlay)
    server_labels = {"app.kubernetes.io/name": server}
    rules = [
        rule
        for o in objects
        if o["kind"] == "NetworkPolicy"
        and "Ingress" in o["spec"].get("policyTypes", [])
        and _selects(o["spec"]["podSelector"], server_labels)
        for rule in o["spec"].get("ingress", [])
    ]

    def from_monitoring(rule: dict[str, Any]) -> bool:
        return any(
            peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
            == "monitoring"
            for peer in rule.get("from", [])
        )

    monitoring_ports = {port["port"] for rule in rules if from_monitoring(rule) for port in rule["ports"]}
    assert monitoring_ports == {9400}
    stateful_set = next(o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == server)
    proxy = next(
        c for c in stateful_set["spec"]["template"]["spec"]["containers"] if c["name"] == "metrics-proxy"
    )
    assert {p["name"]: p["containerPort"] for p in proxy["ports"]} == {"metrics": 9400}
    monitor = next(o for o in objects if o["kind"] == "ServiceMonitor" and o["metadata"]["name"] == server)
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    config = next(
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == f"{server}-metrics-proxy"
    )
    conf = config["data"]["metrics.conf"]
    assert "location = /metrics" in conf and "return 404" in conf  # nothing else is proxied


@pytest.mark.parametrize("overlay", PROD)
def test_prod_pods_read_the_redis_password_from_a_mounted_file(overlay: str) -> None:
    objects = _render(overlay)
    settings = next(
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("gkt-config")
    )
    password_file = Path(settings["data"]["GKT_REDIS_PASSWORD_FILE"])
    for name in GKT:
        deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name)
        pod = deployment["spec"]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == name]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(password_file.parent))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "gkt-redis"
        assert volume["secret"]["items"] == [{"key": "password", "path": password_file.name}]
        env = {e["name"] for e in container.get("env", [])}
        assert not any("PASSWORD" in e for e in env), f"{name} gets a password in its environment"


@pytest.mark.parametrize("overlay", PROD)
def test_prod_gateways_limit_every_key_by_default(overlay: str) -> None:
    objects = _render(overlay)
    settings = next(
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("gkt-config")
    )
    for limit in ("RATE_PER_S", "BURST", "MAX_CONCURRENT", "MAX_QUEUED"):
        assert float(settings["data"][f"GKT_GATEWAY_KEY_{limit}"]) > 0, limit
    assert settings["data"]["GKT_METRICS_ADDR"] == "0.0.0.0"  # scraped from the monitoring namespace
