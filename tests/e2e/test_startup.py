"""A stack starts however far apart its workers become ready (a first model conversion takes minutes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc

from gkt.v1 import guidance_pb2 as pb
from gkt.v1 import guidance_pb2_grpc
from gkt_tools.processes import child_environment, free_port
from gkt_tools.stack import Stack
from tests.e2e.conftest import TINY_STACK_ENV

# Longer than a heartbeat's 60 s life: a student that beat only at start and per job would be gone.
TEACHER_LATE_BY_S = 90


class LateTeacherStack(Stack):
    """A stack whose teacher process starts TEACHER_LATE_BY_S after the others, as a teacher converting its
    model for the first time becomes ready minutes after its students."""

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        if name == "teacher":
            command = ["sh", "-c", f'sleep {TEACHER_LATE_BY_S} && exec "$@"', "late-teacher", *command]
        super()._spawn(name, command, env)


def test_a_teacher_ready_long_after_its_students_still_makes_the_stack_ready(
    tiny_models: tuple[Path, Path], redis_url: str, tmp_path: Path
) -> None:
    teacher, student = tiny_models
    env = {**TINY_STACK_ENV, "GKT_TEACHER_MODEL": str(teacher), "GKT_STUDENT_MODEL": str(student),
           "GKT_KEY_PREFIX": "late"}  # fmt: skip
    stack = LateTeacherStack(
        state_dir=tmp_path,
        env=env,
        redis_url=redis_url.rsplit("/", 1)[0] + "/3",  # its own database: the Celery queue name is shared
        students=1,
        gateway_addr=f"127.0.0.1:{free_port()}",
    )
    stack.start(timeout_s=TEACHER_LATE_BY_S + 240)
    try:
        with grpc.insecure_channel(stack.gateway_addr or "") as channel:
            reply = guidance_pb2_grpc.GuidanceServiceStub(channel).Generate(
                pb.GenerateRequest(query="2+2?", sampling=pb.SamplingParams(max_new_tokens=4, seed=1)),
                timeout=120,
            )
        assert reply.guidance and reply.text.startswith(reply.guidance)
    finally:
        stack.stop()


def test_a_worker_that_fails_to_start_is_named_in_one_line_with_its_log(
    tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    _, student = tiny_models
    env = child_environment({"GKT_STATE_DIR": str(tmp_path / "state"), "GKT_TEACHER_MODEL": str(tmp_path / "no-model"),
           "GKT_STUDENT_MODEL": str(student), "GKT_GATEWAY_ADDR": f"127.0.0.1:{free_port()}",
           **{name: "0" for name in ("GKT_GATEWAY_METRICS_PORT", "GKT_TEACHER_METRICS_PORT", "GKT_STUDENT_METRICS_PORT")}})  # fmt: skip
    env.pop("GKT_REDIS_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "gkt_tools.cli", "up"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: teacher exited with status 1 while loading the model: ")
    assert f"(log {tmp_path / 'state' / 'logs' / 'teacher.log'})" in result.stderr
    assert not (tmp_path / "state" / "stack.json").exists()  # everything it started is stopped again
