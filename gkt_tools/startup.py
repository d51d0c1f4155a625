"""What each worker of a starting stack is doing, read from its log, and one line per worker to show it."""

from __future__ import annotations

import re
import sys
from typing import TextIO

READY = "ready"
# The log messages that mark each step of a worker's start (gkt.models, the teacher loop, the student app).
_READY_MESSAGES = ('"msg": "teacher serving"', '"msg": "student ready"')
_STARTED = '"msg": "starting"'
_LOADED = '"msg": "model loaded"'
_CONVERTING = '"msg": "converting bundled model (first use)"'
_PERCENT = re.compile(r"(\d{1,3})%\|")
_PERCENT_STEP = 10
# pydantic's report of a setting it refused: "<field>\n  <problem> [type=…"
_SETTING_REFUSED = re.compile(r"validation errors? for \w+Settings\n(\w+)\n\s+(.+?) \[type=")


def worker_phase(log: str) -> str:
    """`starting`, `loading the model`, `converting the model n %`, `warming up` or `ready`, from a worker's
    log."""
    if any(message in log for message in _READY_MESSAGES):
        return READY
    if _LOADED in log:
        return "warming up"
    converting = log.rfind(_CONVERTING)
    if converting >= 0:
        percents = _PERCENT.findall(log, converting)
        # The GGUF tensors are de-quantized first (the percentage), then written to the cache.
        return f"converting the model {percents[-1]} %" if percents else "converting the model"
    # Logging starts once the settings are read: before that, the process is still starting.
    return "loading the model" if _STARTED in log else "starting"


def last_message(log: str) -> str:
    """The last line of a log that says something (an error's last line), for a one-line report; for
    settings the process refused, the variable and what is wrong with it."""
    refused = _SETTING_REFUSED.findall(log)
    if refused:
        field, problem = refused[-1]
        return f"GKT_{field.upper()}: {problem}"
    for line in reversed(log.strip().splitlines()):
        line = line.strip()
        if not line or _PERCENT.search(line):
            continue
        message = re.search(r'"msg": "((?:[^"\\]|\\.)*)"', line)
        return (message.group(1) if message else line)[:300]
    return ""


class ProgressLines:
    """One line per worker. On a terminal the lines are rewritten in place; elsewhere (a log, CI) a line is
    printed when a worker's phase changes, with percentages in steps of 10 %."""

    def __init__(self, names: list[str], *, out: TextIO = sys.stdout) -> None:
        self.names = names
        self.out = out
        self._shown: dict[str, str] = {}
        self._drawn = False
        self._in_place = out.isatty()

    def show(self, phases: dict[str, str]) -> None:
        if self._in_place:
            if self._drawn:
                self.out.write(f"\x1b[{len(self.names)}A")
            for name in self.names:
                self.out.write(f"\x1b[2K  {name:<10} {phases.get(name, '')}\n")
            self._drawn = True
        else:
            for name in self.names:
                phase = _coarse(phases.get(name, ""))
                if phase != self._shown.get(name):
                    self.out.write(f"  {name:<10} {phase}\n")
                    self._shown[name] = phase
        self.out.flush()


def _coarse(phase: str) -> str:
    match = re.search(r"(\d+) %$", phase)
    if not match:
        return phase
    return phase[: match.start()] + f"{int(match.group(1)) // _PERCENT_STEP * _PERCENT_STEP} %"
