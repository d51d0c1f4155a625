"""A starting worker's phase read from its log, and the progress lines a user sees."""

from __future__ import annotations

import io

from gkt_tools.startup import ProgressLines, last_message, worker_phase

STARTING = '{"ts": 1.0, "level": "INFO", "logger": "gkt", "msg": "starting", "service": "teacher"}\n'
CONVERTING = (
    STARTING
    + '{"ts": 2.0, "level": "INFO", "logger": "gkt.models", "msg": "converting bundled model (first use)"}\n'
    + "Converting and de-quantizing GGUF tensors...:  12%|#2   | 29/236 [00:03<00:20]\r"
    + "Converting and de-quantizing GGUF tensors...:  47%|####7   | 111/236 [00:12<00:13]\r"
)
LOADED = CONVERTING + '{"ts": 9.0, "level": "INFO", "logger": "gkt.models", "msg": "model loaded"}\n'


def test_a_worker_goes_from_loading_to_converting_to_warming_up_to_ready() -> None:
    assert worker_phase("") == "starting"
    assert worker_phase(STARTING) == "loading the model"
    assert worker_phase(CONVERTING) == "converting the model 47 %"
    assert worker_phase(LOADED) == "warming up"
    assert worker_phase(LOADED + '{"msg": "teacher serving"}\n') == "ready"
    assert worker_phase(LOADED + '{"msg": "student ready"}\n') == "ready"


def test_the_last_message_is_an_errors_last_line_not_a_progress_bar() -> None:
    crash = CONVERTING + "Traceback (most recent call last):\n  File x\nValueError: model not found\n"
    assert last_message(crash) == "ValueError: model not found"
    assert last_message(LOADED) == "model loaded"
    assert last_message("") == ""
    refused = (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for TeacherSettings\n"
        "teacher_max_batch_size\n  Input should be greater than or equal to 1 [type=greater_than_equal, "
        "input_value='0', input_type=str]\n    For further information visit https://errors.pydantic.dev\n"
    )
    assert last_message(STARTING + refused) == (
        "GKT_TEACHER_MAX_BATCH_SIZE: Input should be greater than or equal to 1"
    )


def test_off_a_terminal_a_line_is_printed_only_when_a_phase_changes() -> None:
    out = io.StringIO()
    lines = ProgressLines(["teacher", "student-0"], out=out)
    lines.show({"teacher": "converting the model 41 %", "student-0": "loading the model"})
    lines.show({"teacher": "converting the model 44 %", "student-0": "loading the model"})
    lines.show({"teacher": "converting the model 52 %", "student-0": "ready"})
    assert out.getvalue().splitlines() == [
        "  teacher    converting the model 40 %",
        "  student-0  loading the model",
        "  teacher    converting the model 50 %",
        "  student-0  ready",
    ]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_lines_are_rewritten_in_place() -> None:
    out = _Terminal()
    lines = ProgressLines(["teacher", "student-0"], out=out)
    lines.show({"teacher": "converting the model 41 %", "student-0": "loading the model"})
    first = out.getvalue()
    lines.show({"teacher": "converting the model 44 %", "student-0": "ready"})
    again = out.getvalue()[len(first) :]
    assert first.count("\n") == 2 and "\x1b[" not in first.replace("\x1b[2K", "")
    assert again.startswith("\x1b[2A")  # back up over the two lines, then redraw them
    assert "converting the model 44 %" in again and again.count("\n") == 2
