"""Prometheus for a local stack: the shipped alert rules as a plain rules file, and `make monitor`.

    python scripts/monitor.py rules OUT [--for DURATION]   the PrometheusRule's groups as a Prometheus
                                                           rules file; --for replaces every `for:`
    python scripts/monitor.py serve [--port 9090]          Prometheus scraping `make up`'s stack every
                                                           second, with the shipped rules (make monitor)
    python scripts/monitor.py plot OUT.png [--url URL]     the dashboard's main panels over the last
                                                           minutes, drawn from that Prometheus

Prometheus itself is Debian's `prometheus` package (scripts/ensure-prometheus.sh installs it).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_RULE = REPO / "k8s" / "monitoring" / "prometheusrule.yaml"
DASHBOARD = REPO / "k8s" / "monitoring" / "dashboard.json"
STATE = REPO / ".gkt"
NAMESPACE = "local"
"""The `namespace` label given to local targets, so the dashboard's $namespace filter selects them."""


def rule_groups(*, for_: str | None = None) -> list[dict[str, Any]]:
    """The rule groups of k8s/monitoring/prometheusrule.yaml; `for_` replaces every alert's `for:`."""
    groups: list[dict[str, Any]] = yaml.safe_load(PROMETHEUS_RULE.read_text(encoding="utf-8"))["spec"][
        "groups"
    ]
    if for_ is not None:
        for rule in (rule for group in groups for rule in group["rules"] if "for" in rule):
            rule["for"] = for_
    return groups


def write_rules(path: Path, *, for_: str | None = None) -> Path:
    path.write_text(yaml.safe_dump({"groups": rule_groups(for_=for_)}, sort_keys=False), encoding="utf-8")
    return path


def prometheus_config(*, targets: dict[str, int], rules: Path, interval: str = "1s") -> dict[str, Any]:
    """Scrape each process's /metrics (name → port on 127.0.0.1) as job gkt-<service>, and evaluate `rules`."""
    jobs: dict[str, list[str]] = {}
    for name, port in sorted(targets.items()):
        jobs.setdefault(f"gkt-{name.split('-')[0]}", []).append(f"127.0.0.1:{port}")
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [{"targets": addresses, "labels": {"namespace": NAMESPACE}}],
            }
            for job, addresses in jobs.items()
        ],
    }


def prometheus_command(*, config: Path, data: Path, port: int) -> list[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("prometheus is not installed: run `make setup` (scripts/ensure-prometheus.sh)")
    return [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1d",
        "--log.level=warn",
    ]


def serve(*, port: int, state: Path) -> int:
    record = state / "stack.json"
    if not record.exists():
        raise SystemExit(f"no stack is running ({record} is missing): start one with `make up`")
    targets: dict[str, int] = json.loads(record.read_text())["metrics_ports"]
    if not targets:
        raise SystemExit("the running stack serves no /metrics port (GKT_*_METRICS_PORT=0)")
    home = state / "prometheus"
    home.mkdir(parents=True, exist_ok=True)
    rules = write_rules(home / "rules.yaml")
    config = home / "prometheus.yaml"
    config.write_text(yaml.safe_dump(prometheus_config(targets=targets, rules=rules), sort_keys=False))
    command = prometheus_command(config=config, data=home / "data", port=port)
    print(f"Prometheus: http://127.0.0.1:{port}  (alerts: http://127.0.0.1:{port}/api/v1/alerts)")
    print(
        f"scraping {', '.join(f'{n}:{p}' for n, p in sorted(targets.items()))} every second; Ctrl-C stops it"
    )
    try:
        return subprocess.run(command, check=False).returncode
    except KeyboardInterrupt:
        return 0


# The picture in docs/observability.md: (dashboard panel, the refIds drawn, y axis label, log scale).
PLOTTED = (
    ("Requests per second by RPC", "A", "requests/s", False),
    ("Gateway: whole RPC", "A", "seconds (p50)", True),
    ("Batch size", "ABC", "jobs per batch", False),
    ("Queue depth", "AB", "jobs", False),
)
LATENCY_STAGES = (
    "Queue wait for a teacher",
    "Teacher generation",
    "Student wait",
    "Student generation per job",
)


def plot(*, url: str, out: Path, minutes: float, rate_interval: str = "30s") -> None:
    """Draw the main panels (throughput, p50 latency by stage, teacher batch sizes, queue depth) from the
    dashboard's own queries over the last `minutes`, as Prometheus at `url` answers them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]}
    end = time.time()
    start, step = end - minutes * 60, max(1.0, minutes * 60 / 300)

    def series(title: str, ref: str) -> list[tuple[str, list[float], list[float]]]:
        target = next(t for t in panels[title]["targets"] if t["refId"] == ref)
        expr = target["expr"].replace("$namespace", NAMESPACE).replace("$__rate_interval", rate_interval)
        params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
        with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as reply:
            result = json.loads(reply.read())["data"]["result"]
        drawn = []
        for item in result:
            legend = _legend(target["legendFormat"], item["metric"])
            xs = [(float(t) - end) / 60 for t, _ in item["values"]]
            drawn.append((legend, xs, [float(v) for _, v in item["values"]]))
        return drawn

    figure, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    for axis, (title, refs, ylabel, log) in zip(axes.flat, PLOTTED, strict=True):
        lines = [line for ref in refs for line in series(title, ref)]
        if title == "Gateway: whole RPC":
            title = "Latency by stage (p50)"
            lines = [(f"whole RPC: {legend.split()[0]}", xs, ys) for legend, xs, ys in lines]
            lines += [(stage, xs, ys) for stage in LATENCY_STAGES for _, xs, ys in series(stage, "A")]
        for legend, xs, ys in lines:
            axis.plot(xs, ys, label=legend)
        axis.set_title(title)
        axis.set_ylabel(ylabel)
        axis.set_yscale("log" if log else "linear")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in axes[1]:
        axis.set_xlabel("minutes before now")
    figure.suptitle(f"GKT Serve dashboard panels, from Prometheus at {url}")
    figure.tight_layout()
    figure.savefig(out, dpi=100)


def _legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's legend: each {{label}} replaced by the series' value of that label."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    rules = commands.add_parser("rules", help="write the shipped alert rules as a Prometheus rules file")
    rules.add_argument("out", type=Path)
    rules.add_argument("--for", dest="for_", metavar="DURATION", help="replace every alert's `for:` (tests)")
    serve_parser = commands.add_parser("serve", help="run Prometheus against `make up`'s stack")
    serve_parser.add_argument("--port", type=int, default=9090)
    serve_parser.add_argument("--state", type=Path, default=STATE, help="the stack's state directory")
    plot_parser = commands.add_parser("plot", help="draw the main panels from a running Prometheus")
    plot_parser.add_argument("out", type=Path)
    plot_parser.add_argument("--url", default="http://127.0.0.1:9090", help="Prometheus, default %(default)s")
    plot_parser.add_argument("--minutes", type=float, default=10, help="how far back, default %(default)s")
    args = parser.parse_args(argv)
    if args.command == "plot":
        plot(url=args.url, out=args.out, minutes=args.minutes)
        return 0
    if args.command == "rules":
        write_rules(args.out, for_=args.for_)
        return 0
    return serve(port=args.port, state=args.state)


if __name__ == "__main__":
    sys.exit(main())
