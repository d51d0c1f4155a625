"""`gkt ask`: one question to a running gateway, and its reply printed for a person to read."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import grpc

from gkt import paper
from gkt.client import GatewayConnection
from gkt_tools.arguments import UINT32_MAX, UINT64_MAX, real_number, whole_number
from gkt_tools.connection import (
    CONNECTION_ENV_HELP,
    ConnectionOptionError,
    add_connection_arguments,
    connection_from_args,
)

TASKS = tuple(task.value for task in paper.Task)
MODES = tuple(mode.value for mode in paper.GuidanceMode)
UNREACHABLE_HINT = "is the stack up? `make up`, or `--addr`"
ENV_HELP = CONNECTION_ENV_HELP


def add_arguments(parser: argparse.ArgumentParser, *, default_addr: str) -> None:
    parser.add_argument("query", help="the question (quote it)")
    parser.add_argument(
        "--task",
        choices=TASKS,
        default=paper.Task.FREEFORM.value,
        help="freeform: a plain question; gsm8k, csqa, aqua: the paper's few-shot prompt for that dataset "
        "(default: freeform)",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=paper.GuidanceMode.CUTOFF.value,
        help="guidance: cutoff (the teacher's first N tokens), concise, hint, none (student alone), "
        "full (teacher alone) (default: cutoff)",
    )
    parser.add_argument(
        "--guidance-tokens", dest="max_guidance_tokens", type=whole_number(1, UINT32_MAX), metavar="N",
        help="N, the guidance length in teacher tokens (default: the task's, e.g. "
        f"{paper.TASK_DEFAULTS[paper.Task.GSM8K].max_guidance_tokens} for gsm8k)",
    )  # fmt: skip
    parser.add_argument(
        "--max-new-tokens", type=whole_number(1, UINT32_MAX), metavar="N",
        help="most tokens the student adds (default: the task's)",
    )  # fmt: skip
    parser.add_argument(
        "--temperature",
        type=real_number(0.0, math.inf),
        help=f"student sampling temperature, 0 = greedy (default {paper.STUDENT_TEMPERATURE:g})",
    )
    parser.add_argument(
        "--top-p",
        type=real_number(0.0, 1.0, open_low=True),
        help=f"student nucleus sampling, in (0, 1] (default {paper.STUDENT_TOP_P:g})",
    )
    parser.add_argument(
        "--seed",
        type=whole_number(0, UINT64_MAX),
        help="seed of the job's teacher and student sampling, for a repeatable answer (default: random)",
    )
    parser.add_argument(
        "--stream", action="store_true", help="print the guidance, then the student's text as it is written"
    )
    parser.add_argument(
        "--timeout", type=real_number(0.0, math.inf, open_low=True), default=300.0, metavar="SECONDS",
        help="deadline of the request (default: 300)",
    )  # fmt: skip
    add_connection_arguments(parser, default_addr=default_addr)


def run(args: argparse.Namespace, *, api_key: str | None) -> int:
    """Ask, print the reply; 1 with one line on stderr when the gateway refuses or cannot be reached.
    `api_key`: GKT_API_KEY, sent unless --api-key-file names another."""
    try:
        connection = connection_from_args(args, api_key=api_key)
    except ConnectionOptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    request = build_request(args)
    with connection.open() as channel:
        try:
            if args.stream:
                _stream(
                    channel, connection=connection, request=request, timeout_s=args.timeout, task=args.task
                )
            else:
                print_reply(
                    generate(channel, connection=connection, request=request, timeout_s=args.timeout),
                    task=args.task,
                )
        except grpc.RpcError as exc:
            print(f"error: {explain(exc, channel=channel, addr=connection.addr)}", file=sys.stderr)
            return 1
    return 0


def build_request(args: argparse.Namespace) -> Any:
    from gkt.v1 import guidance_pb2 as pb

    sampling = pb.SamplingParams()
    for name in ("max_new_tokens", "temperature", "top_p", "seed"):
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    guidance = pb.GuidanceParams(mode=pb.GuidanceMode.Value(f"GUIDANCE_MODE_{args.mode.upper()}"))
    if args.max_guidance_tokens is not None:
        guidance.max_guidance_tokens = args.max_guidance_tokens
    return pb.GenerateRequest(
        query=args.query,
        task=pb.Task.Value(f"TASK_{args.task.upper()}"),
        guidance=guidance,
        sampling=sampling,
    )


def generate(channel: grpc.Channel, *, connection: GatewayConnection, request: Any, timeout_s: float) -> Any:
    from gkt.v1 import guidance_pb2_grpc

    stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
    return stub.Generate(request, timeout=timeout_s, metadata=connection.metadata)


def explain(exc: grpc.RpcError, *, channel: grpc.Channel, addr: str) -> str:
    """One line for a failed call; when nothing answers at `addr`, where to look."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and not _reachable(channel):
        return f"cannot reach the gateway at {addr} ({details.splitlines()[0] if details else code.name}): {UNREACHABLE_HINT}"
    return f"{code.name}: {details}"


def print_reply(reply: Any, *, task: str, expected: str | None = None) -> None:
    print(f"guidance : {reply.guidance!r}")
    print(f"text     : {reply.text!r}")
    print_summary(reply, task=task, expected=expected)


def print_summary(reply: Any, *, task: str, expected: str | None = None) -> None:
    """The extracted answer (and whether it is right, when the right one is known), tokens and timings."""
    answer = reply.answer or "(none found in the text)"
    if expected is not None:
        answer += f"   expected {expected}: {'right' if reply.answer == expected else 'wrong'}"
    if task != "freeform":  # a free-form question has no answer to extract
        print(f"answer   : {answer}")
    if reply.degraded:
        print("degraded : no teacher was reading the queue; the student answered alone")
    t = reply.timings
    print(
        f"tokens   : guidance {reply.usage.guidance_tokens}, student {reply.usage.completion_tokens} "
        f"({reply.finish_reason}); seed {reply.seed}"
    )
    print(
        f"timings  : queue {t.queue_wait_ms:.0f} ms | teacher {t.teacher_ms:.0f} ms (batch {t.teacher_batch_size}) | "
        f"student wait {t.student_wait_ms:.0f} ms | student {t.student_ms:.0f} ms | total {t.total_ms:.0f} ms"
    )


def _stream(
    channel: grpc.Channel, *, connection: GatewayConnection, request: Any, timeout_s: float, task: str
) -> None:
    """The guidance on its own line once, then the student's text as it arrives, then the summary."""
    from gkt.v1 import guidance_pb2_grpc

    stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
    for event in stub.GenerateStream(request, timeout=timeout_s, metadata=connection.metadata):
        if event.HasField("guidance"):
            print(f"guidance : {event.guidance.guidance}")
            print("student  : ", end="", flush=True)
        elif event.HasField("delta"):
            print(event.delta.text, end="", flush=True)
        else:
            print()
            print_summary(event.final, task=task)


def _reachable(channel: grpc.Channel) -> bool:
    try:
        grpc.channel_ready_future(channel).result(timeout=1)
    except grpc.FutureTimeoutError:
        return False
    return True
