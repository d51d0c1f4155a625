"""`gkt ask` against a real stack, run as a user runs it: what the reply looks like."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gkt_tools.processes import child_environment
from gkt_tools.stack import Stack

ROOT = Path(__file__).parents[2]


def ask(stack: Stack, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gkt_tools.cli", "ask", "--addr", stack.gateway_addr or "", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=child_environment({"GKT_STATE_DIR": "/nonexistent-gkt-state"}),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_stream_shows_the_guidance_once_then_the_students_text(tiny_stack: Stack) -> None:
    out = ask(tiny_stack, "What is 2 + 2?", "--stream", "--guidance-tokens", "8", "--max-new-tokens", "8",
              "--temperature", "0", "--seed", "3")  # fmt: skip
    lines = out.splitlines()
    assert lines[0].startswith("guidance : ") and lines[1].startswith("student  : ")
    guidance = lines[0].removeprefix("guidance : ")
    assert guidance and out.count(guidance) == 1
    assert any(line.startswith("timings  : ") for line in lines)


def test_a_reply_labels_the_whole_text_and_shows_the_extracted_answer(tiny_stack: Stack) -> None:
    out = ask(
        tiny_stack, "What is 2 + 2?", "--task", "gsm8k", "--guidance-tokens", "4", "--max-new-tokens", "4"
    )
    labels = [line.split(" : ", 1)[0].strip() for line in out.splitlines() if " : " in line]
    assert labels[:3] == ["guidance", "text", "answer"]
