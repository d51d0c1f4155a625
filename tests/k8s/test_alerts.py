"""The alert rules, evaluated by Prometheus' own promtool: each alert fires on the history it is meant
for, after its `for:`, with the labels and annotations a pager shows, and stays silent otherwise.

The cases are in tests/k8s/prometheusrule.test.yaml; they run on the rules `scripts/monitor.py rules`
extracts from k8s/monitoring/prometheusrule.yaml, the file the cluster gets.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("prometheusrule.test.yaml")
RULES = yaml.safe_load((REPO / "k8s" / "monitoring" / "prometheusrule.yaml").read_text(encoding="utf-8"))


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run `make setup` (scripts/ensure-prometheus.sh installs it)")
    return binary


def _rules_file(out: Path, *extra: str) -> Path:
    command = [sys.executable, str(REPO / "scripts" / "monitor.py"), "rules", str(out), *extra]
    subprocess.run(command, check=True, timeout=60)
    return out


def _alerts() -> list[dict[str, Any]]:
    return [rule for group in RULES["spec"]["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    rules = _rules_file(tmp_path / "rules.yaml")
    result = subprocess.run(
        [_promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_every_alert_fires_on_its_history_and_stays_silent_otherwise(tmp_path: Path) -> None:
    _rules_file(tmp_path / "rules.yaml")
    shutil.copy(CASES, tmp_path / CASES.name)
    result = subprocess.run(
        [_promtool(), "test", "rules", CASES.name], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_cases_cover_every_alert() -> None:
    tests = yaml.safe_load(CASES.read_text(encoding="utf-8"))["tests"]
    for alert in _alerts():
        name = alert["alert"]
        histories = [[c for c in test["alert_rule_test"] if c["alertname"] == name] for test in tests]
        checks = [check for history in histories for check in history]
        fired = [expected for check in checks for expected in check["exp_alerts"]]
        assert fired, f"no case in which {name} fires"
        assert any(not check["exp_alerts"] for check in checks), f"no case in which {name} stays silent"
        for expected in fired:
            assert expected["exp_labels"]["severity"] == alert["labels"]["severity"], name
            assert set(expected["exp_annotations"]) == set(alert["annotations"]), name
        if "for" in alert:  # silent, then firing later in the same history: the wait itself is tested
            assert any(_waits_then_fires(history) for history in histories), (
                f"no case shows {name} waiting for its `for: {alert['for']}`"
            )


def test_the_for_substitution_shortens_every_wait_and_changes_nothing_else(tmp_path: Path) -> None:
    shipped = yaml.safe_load(_rules_file(tmp_path / "rules.yaml").read_text())
    short = yaml.safe_load(_rules_file(tmp_path / "short.yaml", "--for", "3s").read_text())
    assert shipped["groups"] == RULES["spec"]["groups"]
    for group, short_group in zip(shipped["groups"], short["groups"], strict=True):
        for rule, short_rule in zip(group["rules"], short_group["rules"], strict=True):
            assert short_rule.pop("for", None) == ("3s" if "for" in rule else None)
            rule.pop("for", None)
            assert short_rule == rule


def _waits_then_fires(checks: list[dict[str, Any]]) -> bool:
    silent = [_minutes(c["eval_time"]) for c in checks if not c["exp_alerts"]]
    firing = [_minutes(c["eval_time"]) for c in checks if c["exp_alerts"]]
    return bool(silent and firing and min(silent) < min(firing))


def _minutes(duration: str) -> float:
    value, unit = float(duration[:-1]), duration[-1]
    return value * {"s": 1 / 60, "m": 1, "h": 60}[unit]
