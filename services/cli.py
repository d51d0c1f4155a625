"""The `gkt` command: run a service, run the whole stack, or ask it a question."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import grpc

STATE_DIR = Path(os.environ.get("GKT_STATE_DIR", ".gkt"))
_TASKS = ("freeform", "gsm8k", "csqa", "aqua")
_MODES = ("cutoff", "concise", "hint", "none", "full")
DEMO_QUESTIONS = (
    ("gsm8k", "A baker makes 24 muffins and sells 3 boxes of 6 muffins. How many muffins are left?"),
    ("csqa", "Where would you put a plate after washing it?\nAnswer Choices: (A) restaurant (B) cupboard "
     "(C) table (D) dishwasher (E) flea market"),
    ("freeform", "Why is the sky blue?"),
)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gkt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("gateway", help="serve the gRPC API")
    commands.add_parser("teacher", help="run a teacher worker")
    student = commands.add_parser(
        "student", help="run a Celery student worker (restarted if it dies; GKT_STUDENT_* settings)"
    )
    student.add_argument("--name", default="student", help="Celery node name (the host is appended)")
    ask = commands.add_parser("ask", help="ask a running gateway a question")
    _add_ask_arguments(ask)
    commands.add_parser("demo", help="start the stack on the bundled models, ask three questions, stop")
    commands.add_parser("up", help="start the stack in the background (state in .gkt/)")
    commands.add_parser("down", help="stop the stack `gkt up` started")
    evaluation = commands.add_parser("eval", help="the paper's evaluation (Table 2) on GSM8K, CSQA or AQuA")
    _add_eval_arguments(evaluation)
    from services.bench import add_arguments as add_bench_arguments

    add_bench_arguments(commands.add_parser("bench", help="load-test the stack; report in docs/benchmarks/"))
    hash_key = commands.add_parser(
        "hash-key", help="print the line for an API key in GKT_GATEWAY_API_KEYS_FILE"
    )
    hash_key.add_argument("key")
    probe = commands.add_parser("probe", help="liveness check for Kubernetes probes")
    probe.add_argument("role", choices=["teacher"])
    args = parser.parse_args(argv)

    if args.command == "gateway":
        from services.gateway.__main__ import main as gateway_main

        gateway_main()
    elif args.command == "teacher":
        from services.teacher.__main__ import main as teacher_main

        teacher_main()
    elif args.command == "student":
        from services.student.__main__ import main as student_main

        sys.exit(student_main(["--name", args.name]))
    elif args.command == "ask":
        sys.exit(_ask(args))
    elif args.command == "demo":
        _demo()
    elif args.command == "up":
        _up()
    elif args.command == "down":
        _down()
    elif args.command == "eval":
        from gkt.evaluation.command import run as run_eval

        sys.exit(run_eval(args))
    elif args.command == "bench":
        from services.bench import run as run_bench

        sys.exit(run_bench(args))
    elif args.command == "hash-key":
        from services.gateway.auth import hash_key as hash_api_key

        print(hash_api_key(args.key))
    elif args.command == "probe":
        sys.exit(_probe_teacher())


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from gkt.evaluation.command import add_arguments

    add_arguments(parser)


def _add_ask_arguments(ask: argparse.ArgumentParser) -> None:
    ask.add_argument("query")
    ask.add_argument("--addr", default=os.environ.get("GKT_GATEWAY_ADDR", "127.0.0.1:50051"))
    ask.add_argument("--tls-ca", type=Path, help="PEM CA bundle: connect with TLS, trusting this CA")
    ask.add_argument("--tls-cert", type=Path, help="PEM client certificate, for mutual TLS (with --tls-key)")
    ask.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    ask.add_argument("--task", choices=_TASKS, default="freeform")
    ask.add_argument("--mode", choices=_MODES, default="cutoff")
    ask.add_argument("--guidance-tokens", type=int)
    ask.add_argument("--max-new-tokens", type=int)
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--top-p", type=float)
    ask.add_argument("--seed", type=int)
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    ask.add_argument(
        "--api-key", default=os.environ.get("GKT_API_KEY"), help="sent as a Bearer token (GKT_API_KEY)"
    )


def _request(args: argparse.Namespace):
    from gkt.v1 import guidance_pb2 as pb

    sampling = pb.SamplingParams()
    for name, value in (
        ("max_new_tokens", args.max_new_tokens),
        ("temperature", args.temperature),
        ("top_p", args.top_p),
        ("seed", args.seed),
    ):
        if value is not None:
            setattr(sampling, name, value)
    guidance = pb.GuidanceParams(mode=pb.GuidanceMode.Value(f"GUIDANCE_MODE_{args.mode.upper()}"))
    if args.guidance_tokens is not None:
        guidance.max_guidance_tokens = args.guidance_tokens
    return pb.GenerateRequest(
        query=args.query,
        task=pb.Task.Value(f"TASK_{args.task.upper()}"),
        guidance=guidance,
        sampling=sampling,
    )


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """Plaintext unless --tls-ca is given; a client certificate too for mutual TLS."""
    ca = getattr(args, "tls_ca", None)
    if ca is None:
        return grpc.insecure_channel(args.addr)
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(args.addr, credentials)


def _ask(args: argparse.Namespace) -> int:
    from gkt.v1 import guidance_pb2_grpc

    with _channel(args) as channel:
        stub = guidance_pb2_grpc.GuidanceServiceStub(channel)
        metadata = (("authorization", f"Bearer {args.api_key}"),) if getattr(args, "api_key", None) else None
        try:
            if args.stream:
                for event in stub.GenerateStream(_request(args), timeout=args.timeout, metadata=metadata):
                    if event.HasField("guidance"):
                        print(f"[guidance] {event.guidance.guidance}\n[answer] ", end="", flush=True)
                        print(event.guidance.guidance, end="", flush=True)
                    elif event.HasField("delta"):
                        print(event.delta.text, end="", flush=True)
                    else:
                        print()
                        _print_final(event.final)
            else:
                _print_reply(stub.Generate(_request(args), timeout=args.timeout, metadata=metadata))
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def _print_reply(reply) -> None:
    print(f"guidance : {reply.guidance!r}")
    print(f"answer   : {reply.text!r}")
    _print_final(reply)


def _print_final(reply) -> None:
    t = reply.timings
    if reply.answer:
        print(f"extracted: {reply.answer}")
    print(
        f"tokens   : guidance {reply.usage.guidance_tokens}, student {reply.usage.completion_tokens} "
        f"({reply.finish_reason})"
    )
    print(
        f"timings  : queue {t.queue_wait_ms:.0f} ms | teacher {t.teacher_ms:.0f} ms (batch {t.teacher_batch_size}) | "
        f"student wait {t.student_wait_ms:.0f} ms | student {t.student_ms:.0f} ms | total {t.total_ms:.0f} ms"
    )


def _demo() -> None:
    from services.stack import Stack, free_port

    state = Path(tempfile.mkdtemp(prefix="gkt-demo-"))
    redis_url = os.environ.get("GKT_REDIS_URL")
    addr = os.environ.get("GKT_GATEWAY_ADDR", f"127.0.0.1:{free_port()}")
    env = {"GKT_GATEWAY_METRICS_PORT": "0", "GKT_TEACHER_METRICS_PORT": "0", "GKT_STUDENT_METRICS_PORT": "0"}
    stack = Stack(state_dir=state, env=env, redis_url=redis_url, gateway_addr=addr)
    print("starting Redis, teacher (gemma-3-270m), student (smollm2-135m-instruct) and gateway…")
    print("(the first run converts the bundled GGUF models: a minute or two; later runs are quick)")
    started = time.monotonic()
    stack.start()
    print(f"stack ready in {time.monotonic() - started:.0f} s; logs in {state / 'logs'}\n")
    try:
        for task, question in DEMO_QUESTIONS:
            print(f"=== {task}: {question}")
            args = argparse.Namespace(
                query=question, addr=addr, task=task, mode="cutoff", guidance_tokens=None, max_new_tokens=None,
                temperature=0.0, top_p=None, seed=0, stream=False, timeout=600.0,
            )  # fmt: skip
            if _ask(args):
                sys.exit(1)
            print()
    finally:
        stack.stop()
        print("stack stopped")


def _up() -> None:
    from services.stack import Stack

    stack = Stack(state_dir=STATE_DIR, redis_url=os.environ.get("GKT_REDIS_URL"), detach=True)
    stack.start()
    print(f"stack up: gateway {stack.gateway_addr}, Redis {stack.redis_url}; logs in {STATE_DIR / 'logs'}")
    print('try: gkt ask "What is 12 * 7?"   stop: make down')


def _down() -> None:
    from services.stack import stop_detached

    stopped = stop_detached(STATE_DIR)
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing running")


def _probe_teacher() -> int:
    """0 when a teacher on this host wrote its heartbeat in the last minute."""
    from redis import Redis

    from gkt.config import CommonSettings
    from gkt.queue import Keys

    settings = CommonSettings()
    keys = Keys(settings.key_prefix)
    redis = Redis.from_url(settings.redis_url, socket_timeout=3)
    pattern = keys.heartbeat("teacher", f"{socket.gethostname()}-*")
    for key in redis.scan_iter(match=pattern):
        beat = redis.get(key)
        if beat and time.time() - float(beat) < 60:
            return 0
    print(f"no fresh teacher heartbeat ({pattern})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    main()
