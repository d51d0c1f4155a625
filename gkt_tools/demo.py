"""`gkt demo`: start a private stack, ask it three questions, show each answer beside the right one, stop."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import grpc

from gkt.client import GatewayConnection
from gkt.paper import GuidanceMode
from gkt_tools.ask import build_request, explain, generate, print_reply
from gkt_tools.processes import free_port
from gkt_tools.settings import ToolSettings
from gkt_tools.stack import Stack, StackError

_BUNDLED = ("gemma-3-270m", "smollm2-135m-instruct")
# (task, question, the right answer: None for a free-form question, which has none to check)
QUESTIONS = (
    ("gsm8k", "A baker makes 24 muffins and sells 3 boxes of 6 muffins. How many muffins are left?", "6"),
    ("csqa", "Where would you put a plate after washing it?\nAnswer Choices: (A) restaurant (B) cupboard "
     "(C) table (D) dishwasher (E) flea market", "B"),
    ("freeform", "Why is the sky blue?", None),
)  # fmt: skip


def run(settings: ToolSettings) -> int:
    from gkt.models import needs_conversion
    from services.student.settings import StudentSettings
    from services.teacher.settings import TeacherSettings

    # The models the stack's workers will load, read as they will read them.
    teacher_settings, student_settings = TeacherSettings(), StudentSettings()
    teacher, student = teacher_settings.local_model, student_settings.student_model
    state = Path(tempfile.mkdtemp(prefix="gkt-demo-"))
    addr = settings.gateway_addr or f"127.0.0.1:{free_port()}"
    env = {"GKT_GATEWAY_METRICS_PORT": "0", "GKT_TEACHER_METRICS_PORT": "0", "GKT_STUDENT_METRICS_PORT": "0"}
    stack = Stack(state_dir=state, env=env, redis_url=settings.redis_url, gateway_addr=addr)
    print(f"starting Redis, teacher ({teacher}), student ({student}) and gateway…")
    cache = teacher_settings.model_cache_dir
    if any(needs_conversion(name=name, cache_dir=cache) for name in (teacher, student)):
        print(
            f"(first run: converting the bundled GGUF models into {cache}: about a minute and a half on 2 "
            "free cores, more when they are busy; later runs are quick)"
        )
    started = time.monotonic()
    try:
        stack.start(progress=True)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"stack ready in {time.monotonic() - started:.0f} s; logs in {state / 'logs'}\n")
    if (teacher, student) == _BUNDLED:
        print(
            "note: the bundled pair (a 270M teacher, a 135M student) shows the system working, not GKT's "
            "accuracy: it is far too small to answer reliably, so expect wrong answers.\n"
        )
    try:
        return _ask_all(addr)
    finally:
        stack.stop()
        print("stack stopped")


def _ask_all(addr: str) -> int:
    connection = GatewayConnection(addr=addr)
    with connection.open() as channel:
        for task, question, expected in QUESTIONS:
            print(f"=== {task}: {question}")
            args = argparse.Namespace(
                query=question, task=task, mode=GuidanceMode.CUTOFF.value, max_guidance_tokens=None, max_new_tokens=None,
                temperature=0.0, top_p=None, seed=0,
            )  # fmt: skip
            try:
                reply = generate(channel, connection=connection, request=build_request(args), timeout_s=600)
            except grpc.RpcError as exc:
                print(f"error: {explain(exc, channel=channel, addr=addr)}", file=sys.stderr)
                return 1
            print_reply(reply, task=task, expected=expected)
            print()
    return 0
