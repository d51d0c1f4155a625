"""The Kubernetes manifests render and validate offline, and the validator rejects broken manifests.

Each broken case edits a copy of k8s/ the way a person might get it wrong, runs the real validator
(scripts/k8s_validate.py: kubectl kustomize, yamllint, kubernetes-validate, the project's CR schemas
and the upstream CRDs when ../shared/ref/crds exists) and checks the failure names the mistake. Its
length is that table of broken cases, one per mistake, beside what each production overlay must render.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gkt_tools.settings import ToolSettings

for _module in ("kubernetes_validate", "yamllint", "jsonschema"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (`make setup` installs the dev extras)")

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not installed: the overlays are rendered with `kubectl kustomize` (kustomize v5)",
)

REPO = Path(__file__).resolve().parents[2]
VALIDATOR = REPO / "scripts" / "k8s_validate.py"
RENDER_TARGETS = (
    "base",
    "monitoring",
    "overlays/dev",
    "overlays/prod",
    "overlays/prod-tgi-hpa",
    "overlays/prod-servers",
)

Mutation = Callable[[Path], None]


def test_every_overlay_renders_and_validates() -> None:
    result = _validate()

    assert result.returncode == 0, result.stdout + result.stderr
    for target in RENDER_TARGETS:
        assert f"ok   {target}: " in result.stdout
    assert "ok   yamllint: " in result.stdout


def test_the_prod_overlay_has_every_production_piece() -> None:
    objects = _render(REPO / "k8s" / "overlays" / "prod")
    kinds = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}

    assert {
        ("StatefulSet", "teacher-server"),
        ("StatefulSet", "redis"),
        ("ScaledObject", "student"),
        ("PodMonitor", "gkt-services"),
        ("ServiceMonitor", "teacher-server"),
    } <= kinds
    server = next(
        obj for obj in objects if obj["metadata"]["name"] == "teacher-server" and obj["kind"] == "StatefulSet"
    )
    assert server["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    student = next(
        obj for obj in objects if obj["kind"] == "Deployment" and obj["metadata"]["name"] == "student"
    )
    assert "replicas" not in student["spec"], "the autoscaler, not `kubectl apply`, owns the student replicas"
    settings = next(obj for obj in objects if obj["kind"] == "ConfigMap")["data"]
    assert settings["GKT_TEACHER_BACKEND"] == "openai"
    assert settings["GKT_TEACHER_URL"] == "http://teacher-server:8000/v1"


def test_the_prod_servers_overlay_runs_students_as_thin_clients_of_a_student_server() -> None:
    objects = _render(REPO / "k8s" / "overlays" / "prod-servers")
    settings = next(
        obj
        for obj in objects
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].startswith("gkt-config")
    )["data"]
    assert (settings["GKT_TEACHER_BACKEND"], settings["GKT_STUDENT_BACKEND"]) == ("openai", "openai")
    assert settings["GKT_STUDENT_URL"] == "http://student-server:8000/v1"
    server = next(
        obj for obj in objects if obj["kind"] == "StatefulSet" and obj["metadata"]["name"] == "student-server"
    )
    (vllm, _proxy) = server["spec"]["template"]["spec"]["containers"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--served-model-name=$(GKT_STUDENT_MODEL)" in vllm["args"]
    api_key = next(e for e in vllm["env"] if e["name"] == "VLLM_API_KEY")["valueFrom"]["secretKeyRef"]
    assert api_key == {"name": "gkt-student-api-key", "key": "api-key"}
    # the students load no model: no GPU, little memory, no shared model cache; the server's key mounted
    student = next(
        obj for obj in objects if obj["kind"] == "Deployment" and obj["metadata"]["name"] == "student"
    )
    pod = student["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert container["resources"]["limits"]["memory"] == "1Gi"
    key_file = Path(settings["GKT_STUDENT_API_KEY_FILE"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(key_file.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "gkt-student-api-key"
    assert not any(obj["kind"] == "PersistentVolumeClaim" for obj in objects)
    assert all("persistentVolumeClaim" not in v for v in pod["volumes"])
    # the autoscaler's unit is one pod's streams
    scaled = next(obj for obj in objects if obj["kind"] == "ScaledObject")
    assert scaled["spec"]["advanced"]["scalingModifiers"]["target"] == settings["GKT_STUDENT_MAX_BATCH"]


@pytest.mark.parametrize("overlay", ["prod", "prod-tgi-hpa", "prod-servers"])
def test_prod_gateways_serve_tls_from_the_secret_and_probe_a_plaintext_health_port(overlay: str) -> None:
    objects = _render(REPO / "k8s" / "overlays" / overlay)
    gateway = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway")
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = next(obj for obj in objects if obj["kind"] == "ConfigMap")["data"]

    volume = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "gkt-gateway-tls")
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert settings["GKT_GATEWAY_TLS_CERT_FILE"] == f"{mount['mountPath']}/tls.crt"
    assert settings["GKT_GATEWAY_TLS_KEY_FILE"] == f"{mount['mountPath']}/tls.key"
    health_port = int(settings["GKT_GATEWAY_HEALTH_ADDR"].rsplit(":", 1)[1])
    assert health_port in {p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health_port, probe


def test_the_dev_overlay_is_cpu_only_and_needs_no_operator() -> None:
    objects = _render(REPO / "k8s" / "overlays" / "dev")

    operator_kinds = [
        obj["kind"] for obj in objects if obj["apiVersion"].startswith(("keda.sh/", "monitoring."))
    ]
    assert operator_kinds == [], "dev must run on a bare cluster: no KEDA, no Prometheus Operator"
    deployments = [obj for obj in objects if obj["kind"] == "Deployment"]
    assert {obj["metadata"]["name"]: obj["spec"]["replicas"] for obj in deployments} == {
        "gateway": 1,
        "teacher": 1,
        "student": 1,
        "redis": 1,
    }
    for deployment in deployments:
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert "nvidia.com/gpu" not in container["resources"]["limits"]
    settings = next(obj for obj in objects if obj["kind"] == "ConfigMap")["data"]
    assert settings["GKT_TEACHER_BACKEND"] == "local"


def _replace(relative: str, old: str, new: str) -> Mutation:
    def mutate(k8s: Path) -> None:
        path = k8s / relative
        text = path.read_text(encoding="utf-8")
        assert old in text, f"{relative} no longer contains {old!r}: update this test case"
        path.write_text(text.replace(old, new, 1), encoding="utf-8")

    return mutate


def _edit_yaml(relative: str, edit: Callable[[list[Any]], None]) -> Mutation:
    def mutate(k8s: Path) -> None:
        path = k8s / relative
        documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        edit(documents)
        path.write_text(yaml.safe_dump_all(documents, sort_keys=False), encoding="utf-8")

    return mutate


def _add_monitoring_resource(document: dict[str, Any]) -> Mutation:
    def mutate(k8s: Path) -> None:
        (k8s / "monitoring" / "extra.yaml").write_text(
            yaml.safe_dump(document, sort_keys=False), encoding="utf-8"
        )
        _replace(
            "monitoring/kustomization.yaml",
            "  - servicemonitor.yaml\n",
            "  - servicemonitor.yaml\n  - extra.yaml\n",
        )(k8s)

    return mutate


def _drop_first_trigger_name(documents: list[Any]) -> None:
    del documents[0]["spec"]["triggers"][0]["name"]


def _drop_triggers(documents: list[Any]) -> None:
    del documents[0]["spec"]["triggers"]


BROKEN: dict[str, tuple[Mutation, str]] = {
    "misspelt Deployment field": (
        _replace("base/gateway.yaml", "terminationGracePeriodSeconds: 60", "terminationGracePeriod: 60"),
        "Deployment gkt/gateway: spec.template.spec: Additional properties are not allowed "
        "('terminationGracePeriod' was unexpected)",
    ),
    "Service port without its required port number": (
        _replace("base/gateway.yaml", "    - name: grpc\n      port: 50051\n", "    - name: grpc\n"),
        "Service gkt/gateway: spec.ports.0: 'port' is a required property",
    ),
    "container port as a string": (
        _replace("base/student.yaml", "containerPort: 9103", 'containerPort: "9103"'),
        "'9103' is not of type 'integer'",
    ),
    "ScaledObject without triggers": (
        _edit_yaml("components/students-keda/scaledobject.yaml", _drop_triggers),
        "ScaledObject gkt/student: spec: 'triggers' is a required property (k8s/schemas)",
    ),
    "ScaledObject formula naming a trigger that has no name": (
        _edit_yaml("components/students-keda/scaledobject.yaml", _drop_first_trigger_name),
        "ScaledObject gkt/student: spec.triggers.0: 'name' is a required property (k8s/schemas)",
    ),
    "ServiceMonitor interval that is not a duration": (
        _replace("monitoring/servicemonitor.yaml", "interval: 15s", "interval: 15 seconds"),
        "ServiceMonitor gkt/teacher-server: spec.endpoints.0.interval: '15 seconds' does not match",
    ),
    "PrometheusRule rule without expr": (
        _add_monitoring_resource(
            {
                "apiVersion": "monitoring.coreos.com/v1",
                "kind": "PrometheusRule",
                "metadata": {"name": "gkt-alerts"},
                "spec": {"groups": [{"name": "gkt", "rules": [{"alert": "GktDown", "for": "5m"}]}]},
            }
        ),
        "PrometheusRule gkt/gkt-alerts: spec.groups.0.rules.0: 'expr' is a required property (k8s/schemas)",
    ),
    "custom resource the project has no schema for": (
        _add_monitoring_resource(
            {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}}
        ),
        "Widget gkt/w: neither Kubernetes 1.32 nor k8s/schemas/ has a schema",
    ),
    "YAML with trailing spaces": (
        _replace(
            "base/serviceaccount.yaml",
            "automountServiceAccountToken: false",
            "automountServiceAccountToken: false  ",
        ),
        "base/serviceaccount.yaml:6:36: trailing spaces (trailing-spaces)",
    ),
    "kustomization listing a missing file": (
        _replace(
            "base/kustomization.yaml",
            "  - networkpolicies.yaml\n",
            "  - networkpolicies.yaml\n  - missing.yaml\n",
        ),
        "FAIL base: kubectl kustomize failed",
    ),
    "student grace period shorter than its task time limit": (
        _replace("base/config.env", "GKT_STUDENT_TASK_TIME_LIMIT_S=300", "GKT_STUDENT_TASK_TIME_LIMIT_S=600"),
        "Deployment gkt/student: container student: terminationGracePeriodSeconds (360) must exceed "
        "GKT_STUDENT_TASK_TIME_LIMIT_S (600)",
    ),
    "gateway grace period shorter than its preStop and drain": (
        _replace("base/config.env", "GKT_GATEWAY_GRACE_S=40", "GKT_GATEWAY_GRACE_S=55"),
        "Deployment gkt/gateway: container gateway: terminationGracePeriodSeconds (60) must exceed its preStop "
        "sleep (5) + GKT_GATEWAY_GRACE_S (55) so calls in flight can finish",
    ),
    "writable root filesystem": (
        _replace("base/teacher.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"),
        "Deployment gkt/teacher: container teacher: securityContext.readOnlyRootFilesystem must be true",
    ),
    "Service selector with a typo": (
        _replace(
            "base/gateway.yaml",
            "  selector:\n    app.kubernetes.io/name: gkt-gateway\n  ports:",
            "  selector:\n    app.kubernetes.io/name: gkt-gateways\n  ports:",
        ),
        "Service gkt/gateway: selector {'matchLabels': {'app.kubernetes.io/name': 'gkt-gateways'}} matches no pod",
    ),
    "HPA scaling a Deployment that does not exist": (
        _replace(
            "components/students-hpa/hpa.yaml",
            "    name: student\n  minReplicas",
            "    name: students\n  minReplicas",
        ),
        "HorizontalPodAutoscaler gkt/student: scales Deployment students, not rendered",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_manifest_fails_validation(case: str, tmp_path: Path) -> None:
    mutate, expected = BROKEN[case]
    k8s = tmp_path / "k8s"
    shutil.copytree(REPO / "k8s", k8s)
    mutate(k8s)

    result = _validate("--k8s-dir", str(k8s))

    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stdout, result.stdout


def test_the_upstream_crds_catch_what_they_define_too(tmp_path: Path) -> None:
    crds = ToolSettings().shared_ref_dir / "crds"
    if not crds.is_dir():
        pytest.skip(f"no upstream CRDs at {crds}")
    k8s = tmp_path / "k8s"
    shutil.copytree(REPO / "k8s", k8s)
    _edit_yaml("components/students-keda/scaledobject.yaml", _drop_triggers)(k8s)

    result = _validate("--k8s-dir", str(k8s), "--crd-dir", str(crds))

    assert "ScaledObject gkt/student: spec: 'triggers' is a required property (upstream CRD)" in result.stdout


def _validate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(VALIDATOR), *args], capture_output=True, text=True, check=False, timeout=300
    )


def _render(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    output = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]
