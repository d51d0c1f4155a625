"""Validate the Kubernetes manifests offline: yamllint, render each kustomization, check every object.

Steps, in order; every problem is reported, and any problem makes the exit status 1:
1. yamllint on every YAML source under k8s/ (config: .yamllint.yaml at the repo root).
2. `kubectl kustomize` on every kustomization that is not a Component (base, overlays/*, monitoring).
3. Each rendered object against the Kubernetes OpenAPI schema of one pinned version, strictly
   (unknown fields fail), with the schemas the `kubernetes-validate` package bundles: no network.
4. Custom resources against the project's own schemas in k8s/schemas/ (the fields we use) and, when
   the upstream CRDs exist ($GKT_SHARED_REF_DIR/crds, default ../shared/ref/crds), against those upstream CRDs' openAPIV3Schema too.
5. Project rules no schema can state: hardened, probed, sized workloads; students that outlive
   their task time limit on shutdown; autoscaler targets, Services and PDBs that select something.
One script, run as `make k8s-validate`: its length is these five steps, kept in the order they run.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource
from yamllint import linter
from yamllint.config import YamlLintConfig

from gkt_tools.settings import ToolSettings

REPO = Path(__file__).resolve().parents[1]
# The oldest Kubernetes minor the manifests support; kubernetes-validate bundles 1.25 to 1.37.
KUBERNETES_VERSION = "1.32"
DEFAULT_CRD_DIR = ToolSettings().shared_ref_dir / "crds"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
AUTOSCALER_KINDS = ("ScaledObject", "HorizontalPodAutoscaler")

Obj = dict[str, Any]
# libyaml's parser when PyYAML has it: the rendered overlays are thousands of lines.
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# kubernetes-validate parses its 1.3 MB definitions file again for every object: parse each file once.
# (The parsed schemas are only read, never changed, so sharing them is safe.)
kubernetes_validate.utils.schema_contents = functools.cache(kubernetes_validate.utils.schema_contents)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("k8s-validate: kubectl not found (it renders the overlays with its built-in kustomize v5)")
        return 2
    k8s_dir: Path = args.k8s_dir.resolve()
    checker = ObjectChecker(
        version=args.kubernetes_version,
        schema_dir=k8s_dir / "schemas",
        crd_dir=args.crd_dir if args.crd_dir.is_dir() else None,
    )
    print(f"k8s-validate: {checker.describe()}")

    sources = _yaml_sources(k8s_dir)
    targets = _render_targets(k8s_dir)
    with ThreadPoolExecutor() as pool:
        # Step 2 (the renders) runs in the background while step 1 (yamllint) reads the sources.
        renders = [pool.submit(_render, kubectl, target) for target in targets]
        lint_problems = list(_lint(sources, k8s_dir, args.yamllint_config))
        problems = _report("yamllint", f"{len(sources)} files", lint_problems)
        rendered = 0
        for target, render in zip(targets, renders, strict=True):
            name = target.relative_to(k8s_dir).as_posix()
            result = render.result()
            if result.returncode != 0:
                problems += _report(name, "kubectl kustomize failed", [result.stderr.strip()])
                continue
            # Steps 3 and 4 for each object, then step 5 across the whole render.
            objects = [doc for doc in yaml.load_all(result.stdout, Loader=Loader) if doc]
            found = [f"{_describe(obj)}: {message}" for obj in objects for message in checker.check(obj)]
            found += _project_rules(objects)
            problems += _report(name, f"{len(objects)} objects", found)
            rendered += len(objects)

    verdict = f"{problems} problem(s)" if problems else "all valid"
    print(f"k8s-validate: {len(sources)} YAML files and {rendered} rendered objects checked: {verdict}")
    return 1 if problems else 0


def _report(name: str, summary: str, problems: list[str]) -> int:
    print(f"{'FAIL' if problems else 'ok  '} {name}: {summary}")
    for problem in problems:
        print(f"       {problem}")
    return len(problems)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--k8s-dir", type=Path, default=REPO / "k8s", help="manifests root (default: k8s/)")
    parser.add_argument(
        "--kubernetes-version", default=KUBERNETES_VERSION, help="schema version to check against"
    )
    parser.add_argument(
        "--crd-dir", type=Path, default=DEFAULT_CRD_DIR, help="upstream CRDs (used when present)"
    )
    parser.add_argument(
        "--yamllint-config", type=Path, default=REPO / ".yamllint.yaml", help="yamllint config"
    )
    return parser.parse_args(argv)


class ObjectChecker:
    """Checks one rendered object against the Kubernetes schemas or, for a custom resource, its schemas."""

    def __init__(self, *, version: str, schema_dir: Path, crd_dir: Path | None) -> None:
        self.version = version
        self.crd_dir = crd_dir
        self.project_schemas: dict[tuple[str, str], Obj] = {}
        resources = []
        for path in sorted(schema_dir.glob("*.json")):
            schema = json.loads(path.read_text(encoding="utf-8"))
            jsonschema.Draft202012Validator.check_schema(schema)
            resources.append((schema["$id"], Resource.from_contents(schema)))
            properties = schema.get("properties", {})
            if "apiVersion" in properties and "kind" in properties:
                self.project_schemas[(properties["apiVersion"]["const"], properties["kind"]["const"])] = (
                    schema
                )
        # Schemas refer to each other's definitions by $id; nothing is ever fetched.
        self.registry: Registry[Any] = Registry().with_resources(resources)
        self.upstream_crds = _load_upstream_crds(crd_dir) if crd_dir else {}

    def describe(self) -> str:
        upstream = (
            f"{len(self.upstream_crds)} upstream CRDs from {self.crd_dir}"
            if self.upstream_crds
            else "no upstream CRDs"
        )
        return (
            f"Kubernetes {self.version} schemas (kubernetes-validate {kubernetes_validate.__version__}, strict), "
            f"{len(self.project_schemas)} project schemas, {upstream}"
        )

    def check(self, obj: Obj) -> Iterator[str]:
        try:
            kubernetes_validate.validate(obj, self.version, strict=True)
            return
        except kubernetes_validate.ValidationError as error:
            yield f"{_path(error.path)}: {error.message}"
            return
        except kubernetes_validate.SchemaNotFoundError:
            pass  # not a built-in kind: a custom resource
        key = (obj.get("apiVersion", ""), obj.get("kind", ""))
        schema = self.project_schemas.get(key)
        if schema is None:
            yield (
                f"neither Kubernetes {self.version} nor k8s/schemas/ has a schema for "
                f"apiVersion {key[0]!r} kind {key[1]!r} (a custom resource needs one in k8s/schemas/)"
            )
            return
        for problem in _errors(jsonschema.Draft202012Validator(schema, registry=self.registry), obj):
            yield f"{_path(problem.path)}: {problem.message} (k8s/schemas)"
        if key in self.upstream_crds:
            # CRD schemas are OpenAPI v3 (Draft 4 based); x-kubernetes-* and CEL rules are not enforced.
            for problem in _errors(jsonschema.Draft4Validator(self.upstream_crds[key]), obj):
                yield f"{_path(problem.path)}: {problem.message} (upstream CRD)"


def _yaml_sources(k8s_dir: Path) -> list[Path]:
    return sorted([*k8s_dir.rglob("*.yaml"), *k8s_dir.rglob("*.yml")])


def _lint(sources: list[Path], k8s_dir: Path, config_file: Path) -> Iterator[str]:
    """yamllint: every problem counts, warnings included."""
    config = YamlLintConfig(file=str(config_file))
    for path in sources:
        for problem in linter.run(path.read_text(encoding="utf-8"), config, str(path)):
            where = f"{path.relative_to(k8s_dir).as_posix()}:{problem.line}:{problem.column}"
            yield f"{where}: {problem.desc} ({problem.rule})"


def _render(kubectl: str, target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, check=False)


def _render_targets(k8s_dir: Path) -> list[Path]:
    """Every directory with a Kustomization (Components cannot be built on their own)."""
    targets = []
    for path in sorted(k8s_dir.rglob("kustomization.yaml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if document.get("kind", "Kustomization") != "Component":
            targets.append(path.parent)
    return targets


def _project_rules(objects: list[Obj]) -> list[str]:
    """Problems no schema can see; tolerant of malformed objects, which the schemas already report."""
    problems: list[str] = []
    workloads = [obj for obj in objects if obj.get("kind") in WORKLOAD_KINDS]
    config_maps = {
        obj["metadata"]["name"]: obj.get("data", {}) for obj in objects if obj.get("kind") == "ConfigMap"
    }
    for workload in workloads:
        problems += [
            f"{_describe(workload)}: {message}" for message in _workload_rules(workload, config_maps)
        ]
    pod_labels = [_dig(w, "spec", "template", "metadata", "labels") for w in workloads]
    for obj in objects:
        spec = obj.get("spec", {})
        target = spec.get("scaleTargetRef") if obj.get("kind") in AUTOSCALER_KINDS else None
        if target is not None:
            kind, name = target.get("kind", "Deployment"), target.get("name")
            if not any(w["kind"] == kind and w["metadata"]["name"] == name for w in workloads):
                problems.append(f"{_describe(obj)}: scales {kind} {name}, not rendered")
            low = spec.get("minReplicaCount", spec.get("minReplicas", 1))
            high = spec.get("maxReplicaCount", spec.get("maxReplicas", 100))
            if low > high:
                problems.append(f"{_describe(obj)}: min replicas {low} > max replicas {high}")
        selector = _selector_of(obj)
        if selector is not None and not any(_matches(selector, labels) for labels in pod_labels):
            problems.append(f"{_describe(obj)}: selector {selector} matches no pod template in this render")
    return problems


def _workload_rules(workload: Obj, config_maps: dict[str, dict[str, str]]) -> Iterator[str]:
    pod = _dig(workload, "spec", "template", "spec")
    if not _dig(pod, "securityContext").get("runAsNonRoot"):
        yield "pod securityContext.runAsNonRoot must be true"
    for container in pod.get("containers", []):
        name = container.get("name", "?")
        security = container.get("securityContext", {})
        if security.get("allowPrivilegeEscalation") is not False:
            yield f"container {name}: securityContext.allowPrivilegeEscalation must be false"
        if security.get("readOnlyRootFilesystem") is not True:
            yield f"container {name}: securityContext.readOnlyRootFilesystem must be true"
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in container:
                yield f"container {name}: needs a {probe}"
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(bound, {}))
            if missing:
                yield f"container {name}: resources.{bound} lacks {', '.join(sorted(missing))}"
        settings: dict[str, str] = {}
        for source in container.get("envFrom", []):
            settings.update(config_maps.get(_dig(source, "configMapRef").get("name", ""), {}))
        if _is_gateway(container):
            drain_s = float(settings.get("GKT_GATEWAY_GRACE_S", "10"))
            pre_stop_s = int(_dig(container, "lifecycle", "preStop", "sleep").get("seconds", 0))
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if grace <= pre_stop_s + drain_s:
                yield (
                    f"container {name}: terminationGracePeriodSeconds ({grace}) must exceed its preStop sleep "
                    f"({pre_stop_s}) + GKT_GATEWAY_GRACE_S ({drain_s:g}) so calls in flight can finish"
                )
        if _is_celery_worker(container):
            limit = int(settings.get("GKT_STUDENT_TASK_TIME_LIMIT_S", "300"))
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if grace <= limit:
                yield (
                    f"container {name}: terminationGracePeriodSeconds ({grace}) must exceed "
                    f"GKT_STUDENT_TASK_TIME_LIMIT_S ({limit}) so a warm shutdown can finish the running jobs"
                )


def _is_gateway(container: Obj) -> bool:
    words = [*container.get("command", []), *container.get("args", [])]
    return "gateway" in words


def _is_celery_worker(container: Obj) -> bool:
    """A student: `gkt student` (the worker under its restarting parent) or a bare `celery … worker`."""
    words = [*container.get("command", []), *container.get("args", [])]
    return ("gkt" in words and "student" in words) or ("celery" in words and "worker" in words)


def _selector_of(obj: Obj) -> Obj | None:
    """The pod selector of a Service or PodDisruptionBudget, as matchLabels/matchExpressions."""
    if obj.get("kind") == "Service" and _dig(obj, "spec").get("selector"):
        return {"matchLabels": obj["spec"]["selector"]}
    if obj.get("kind") == "PodDisruptionBudget":
        return _dig(obj, "spec", "selector")
    return None


def _matches(selector: Obj, labels: dict[str, str]) -> bool:
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if (
            (operator == "In" and labels.get(key) not in values)
            or (operator == "NotIn" and labels.get(key) in values)
            or (operator == "Exists" and not present)
            or (operator == "DoesNotExist" and present)
        ):
            return False
    return True


def _load_upstream_crds(crd_dir: Path) -> dict[tuple[str, str], Obj]:
    """openAPIV3Schema of every served version of every CRD in crd_dir, keyed by apiVersion and kind."""
    crds: dict[tuple[str, str], Obj] = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                crds[key] = version["schema"]["openAPIV3Schema"]
    return crds


def _errors(validator: jsonschema.protocols.Validator, obj: Obj) -> list[jsonschema.ValidationError]:
    return sorted(validator.iter_errors(obj), key=lambda error: [str(part) for part in error.path])


def _dig(obj: Obj, *keys: str) -> Obj:
    """obj[k1][k2]..., or {} where a level is missing."""
    for key in keys:
        obj = obj.get(key) or {}
    return obj


def _describe(obj: Obj) -> str:
    metadata = obj.get("metadata", {})
    namespace = f"{metadata['namespace']}/" if "namespace" in metadata else ""
    return f"{obj.get('kind', '?')} {namespace}{metadata.get('name', '?')}"


def _path(parts: Iterable[Any]) -> str:
    return ".".join(str(part) for part in parts) or "(object)"


if __name__ == "__main__":
    sys.exit(main())
