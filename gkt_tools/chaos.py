"""`gkt chaos`: the fault matrix against a real local stack (every scenario of `gkt_tools.scenarios`), with
a progress bar while it runs and a table of what the calls came to, on stdout and in a Markdown file.

The stack runs the models GKT_TEACHER_MODEL and GKT_STUDENT_MODEL name (the bundled ones by default);
the Sentinel failover runs on a second stack whose Redis is a Sentinel group of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from gkt.connections import connect, outlasting
from gkt.keys import Keys
from gkt_tools import scenarios
from gkt_tools.arguments import whole_number
from gkt_tools.load import Tally
from gkt_tools.processes import free_port
from gkt_tools.scenarios import SCENARIOS, Row, Target, wait_healthy
from gkt_tools.sentinel import SentinelGroup
from gkt_tools.settings import ChaosSettings, ToolSettings
from gkt_tools.stack import Stack, StackError
from services.student.settings import BUNDLED_STUDENT
from services.teacher.settings import BUNDLED_TEACHER

RECOVERY_GOAL_S = 30.0
_HEADER = (
    "| scenario | sent | answered | failed by status | lost | duplicated | seconds to recover "
    "| failed, answered on retry | student worker restarts |"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(SCENARIOS)
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma list of {names} (default: all)"
    )
    parser.add_argument(
        "--calls",
        type=whole_number(1, 1000),
        default=8,
        help="calls in flight at each fault (default: %(default)s)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=whole_number(1, 1024),
        default=48,
        help="student tokens per call: long enough that a fault meets running jobs (default: %(default)s)",
    )
    parser.add_argument(
        "--deadline", type=whole_number(10, 3600), default=180,
        help="each call's deadline in seconds: a call still unanswered then is lost (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--students", type=whole_number(2, 16), default=2, help="student workers (default: %(default)s)"
    )
    parser.add_argument(
        "--teachers", type=whole_number(1, 8), default=2,
        help="teacher workers: with 2 or more, a killed teacher's batch is taken over by another (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, help="the table's Markdown file (default: $GKT_STATE_DIR/chaos.md)"
    )
    parser.add_argument(
        "--state-dir", type=Path, help="the stacks' state and logs (default: $GKT_STATE_DIR/chaos)"
    )


def run(args: argparse.Namespace, *, settings: ToolSettings) -> int:
    chosen = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown or not chosen:
        print(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}", file=sys.stderr
        )
        return 2
    chosen = [name for name in SCENARIOS if name in chosen]
    args.out = args.out or settings.state_dir / "chaos.md"
    args.state_dir = args.state_dir or settings.state_dir / "chaos"
    chaos = ChaosSettings()
    # A plain SIGTERM would skip the `finally` that stops the stacks: exit through it instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = datetime.now(UTC)
    rows: list[Row | tuple[str, str]] = []
    bar = tqdm(total=len(chosen), desc="chaos", unit="scenario", file=sys.stderr, dynamic_ncols=True)
    try:
        plain = [name for name in chosen if name != "sentinel-failover"]
        if plain:
            with _target(args, chaos, bar, sentinel=False) as target:
                rows += _run_scenarios(plain, target, bar)
        if "sentinel-failover" in chosen:
            with _target(args, chaos, bar, sentinel=True) as target:
                rows += _run_scenarios(["sentinel-failover"], target, bar)
    except StackError as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    bar.close()
    report = _report(rows, args=args, chaos=chaos, started=started)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    print(f"table written to {args.out}", file=sys.stderr)
    return 0 if all(isinstance(row, Row) and not _misses(row) for row in rows) else 1


def _run_scenarios(names: list[str], target: Target, bar: tqdm[None]) -> list[Row | tuple[str, str]]:
    rows: list[Row | tuple[str, str]] = []
    for name in names:
        target.step = _showing(bar, name)
        try:
            wait_healthy(target)
            rows.append(SCENARIOS[name](target))
        except (TimeoutError, RuntimeError) as exc:
            rows.append((name, str(exc)))
        bar.update(1)
    return rows


def _showing(bar: tqdm[None], scenario: str) -> Callable[[str], None]:
    """What the bar says a scenario is doing."""

    def step(text: str) -> None:
        bar.set_postfix_str(f"{scenario}: {text}")

    return step


@contextlib.contextmanager
def _target(
    args: argparse.Namespace, chaos: ChaosSettings, bar: tqdm[None], *, sentinel: bool
) -> Iterator[Target]:
    state = args.state_dir / ("sentinel" if sentinel else "stack")
    group = SentinelGroup(state / "redis") if sentinel else None
    stack = Stack(
        state_dir=state,
        env=chaos.stack_env(),
        students=args.students,
        teachers=args.teachers,
        gateway_addr=f"127.0.0.1:{free_port()}",
    )
    try:
        if group is not None:
            bar.set_postfix_str("starting a Sentinel group")
            group.start()
            stack.redis_url = group.url
        bar.set_postfix_str(f"starting a stack (logs in {state / 'logs'})")
        stack.start()
        keys = Keys(chaos.key_prefix)
        yield Target(
            stack=stack,
            redis=connect(stack.redis_url or "", retry=outlasting(30)),
            keys=keys,
            request=lambda index: scenarios.request(index, max_new_tokens=args.max_new_tokens),
            calls=args.calls,
            deadline_s=args.deadline,
            sentinels=group,
        )
    finally:
        stack.stop()
        if group is not None:
            group.stop()


def _misses(row: Row) -> list[str]:
    """The goals a scenario missed: nothing lost, nothing twice, no INTERNAL/UNKNOWN, recovery in 30 s."""
    counted: Tally = row.tally
    missed = [f"{counted.lost} lost"] if counted.lost else []
    if counted.duplicated:
        missed.append(f"{counted.duplicated} duplicated")
    if counted.server_faults:
        missed.append(f"{counted.server_faults} INTERNAL/UNKNOWN")
    if not row.recovered:
        missed.append("never answered again")
    elif row.recovery_s is not None and row.recovery_s > RECOVERY_GOAL_S:
        missed.append(f"recovered in {row.recovery_s:.1f} s")
    if row.retries.answered < row.retries.sent:
        missed.append(f"{row.retries.sent - row.retries.answered} of {row.retries.sent} retries unanswered")
    return missed


def _report(
    rows: list[Row | tuple[str, str]], *, args: argparse.Namespace, chaos: ChaosSettings, started: datetime
) -> str:
    command = (
        f"gkt chaos --scenarios {args.scenarios} --calls {args.calls} --max-new-tokens {args.max_new_tokens} "
        f"--deadline {args.deadline} --students {args.students} --teachers {args.teachers}"
    )
    lines = [
        f"`{command}`, {started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs ({platform.machine()}); teacher "
        f"{chaos.teacher_model or BUNDLED_TEACHER}, student {chaos.student_model or BUNDLED_STUDENT}, "
        f"{args.teachers} teachers, "
        f"{args.students} students; "
        f"{args.calls} streaming calls in flight at each fault, {args.max_new_tokens} new tokens each, "
        f"deadline {args.deadline} s",
        "",
        _HEADER,
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    missed: list[str] = []
    for row in rows:
        if not isinstance(row, Row):
            lines.append(f"| {row[0]} | – | – | could not run: {row[1]} | – | – | – | – | – |")
            missed.append(f"{row[0]}: could not run")
            continue
        counted = row.tally
        recovery = (
            "never" if not row.recovered else "–" if row.recovery_s is None else f"{row.recovery_s:.1f}"
        )
        retried = f"{row.retries.answered} of {row.retries.sent}" if row.retries.sent else "–"
        lines.append(
            f"| {row.scenario} | {counted.sent} | {counted.answered} | {counted.failed_text()} | "
            f"{counted.lost} | {counted.duplicated} | {recovery} | {retried} | {row.worker_restarts} |"
        )
        missed += [f"{row.scenario}: {miss}" for miss in _misses(row)]
    took = f"(the matrix took {time.time() - started.timestamp():.0f} s)"
    if missed:
        lines += ["", f"goal missed {took}: " + "; ".join(missed)]
    else:
        lines += ["", f"goal met {took}: nothing lost or answered twice, no INTERNAL or UNKNOWN, every "
                  f"recovery within {RECOVERY_GOAL_S:.0f} s, every failed call answered on its retry"]  # fmt: skip
    return "\n".join(lines)
