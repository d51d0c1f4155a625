"""Settings are read by the settings classes alone: no module reads `os.environ` or `os.getenv` by hand.

The one exception hands this process's environment down to a child process (`gkt_tools.processes`), which
reads its own settings from it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TREES = ("gkt", "services", "gkt_tools", "scripts", "tests")
HANDS_DOWN = REPO / "gkt_tools" / "processes.py"


def environment_reads(path: Path) -> list[int]:
    """The lines of `path` that use os.environ, os.getenv or os.putenv."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os":
            names = {node.attr}
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            names = {alias.name for alias in node.names}
        else:
            continue
        if names & {"environ", "environb", "getenv", "getenvb", "putenv"}:
            found.add(node.lineno)
    return sorted(found)


def test_only_settings_classes_read_the_environment() -> None:
    reads = [
        where
        for tree in TREES
        for path in sorted((REPO / tree).rglob("*.py"))
        if path != HANDS_DOWN and not path.is_relative_to(REPO / "gkt" / "v1")
        for where in (f"{path.relative_to(REPO)}:{line}" for line in environment_reads(path))
    ]
    assert reads == []


def test_a_read_by_hand_would_be_found(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom os import getenv\nA = os.environ.get('X')\nB = os.getenv('Y')\n")
    assert environment_reads(sample) == [2, 3, 4]
    assert environment_reads(HANDS_DOWN)  # the exception is real, and found by the same walk
