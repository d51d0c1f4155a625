"""`gkt chaos` end to end on the tiny models: the command starts its own stack, breaks it as two scenarios
say, and writes the table; a student worker killed is started again once, a Redis restart costs none, and
a call failed by the fault is answered when retried with its request id."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gkt_tools.processes import child_environment

TABLE_HEADER = "| scenario | sent | answered | failed by status | lost | duplicated |"


def _rows(table: str) -> dict[str, list[str]]:
    """The table's rows by scenario, each as its cells."""
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and not line.startswith(TABLE_HEADER) and len(cells) == 9:
            rows[cells[0]] = cells[1:]
    return rows


def test_gkt_chaos_runs_two_scenarios_and_writes_their_table(
    tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    teacher, student = tiny_models
    out = tmp_path / "chaos.md"
    env = child_environment(
        {
            "GKT_TEACHER_MODEL": str(teacher),
            "GKT_STUDENT_MODEL": str(student),
            "GKT_STUDENT_WARMUP": "false",
            "GKT_TEACHER_TEMPERATURE": "0",
        }
    )
    command = [
        sys.executable, "-m", "gkt_tools.cli", "chaos", "--scenarios", "pool-process,redis-restart", "--calls", "8", "--max-new-tokens", "300",
        "--deadline", "120", "--out", str(out), "--state-dir", str(tmp_path / "state"),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)

    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    table = out.read_text()
    assert TABLE_HEADER in table and table.strip() in done.stdout
    assert "goal met" in table
    rows = _rows(table)
    assert set(rows) == {"pool process killed", "Redis restarted during jobs"}
    for sent, answered, failed, lost, duplicated, recovery, retried, _restarts in rows.values():
        assert (sent, lost, duplicated) == ("8", "0", "0")
        unavailable = 0 if failed == "0" else int(failed.removeprefix("UNAVAILABLE "))  # no other status
        assert int(answered) + unavailable == 8
        assert float(recovery) <= 30
        # each failed call, sent again with its request id once the stack answers, gets its answer
        assert retried == (f"{unavailable} of {unavailable}" if unavailable else "–")
    assert rows["pool process killed"][1] == "8"  # every job of the killed process answered by a takeover
    assert rows["pool process killed"][7] == "1"
    assert rows["Redis restarted during jobs"][7] == "0"  # the workers outlived the broker connection
    assert "chaos:" in done.stderr  # the progress bar
