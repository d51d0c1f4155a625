"""The `gkt` command: run a service, run the whole stack, ask it a question, or see how it is doing."""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
import time
from typing import TYPE_CHECKING, NoReturn

from gkt.client import DEFAULT_GATEWAY_ADDR
from gkt_tools.settings import ToolSettings

if TYPE_CHECKING:
    from pydantic import ValidationError

    from gkt.config import CommonSettings

_STATE_HELP = "  GKT_STATE_DIR          where `gkt up` keeps its state and logs (default: .gkt)"
_REDIS_HELP = (
    "  GKT_REDIS_URL          Redis of the stack; GKT_REDIS_PASSWORD_FILE, GKT_KEY_PREFIX as the services"
)


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line that says where to read more, not the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def main(argv: list[str] | None = None) -> None:
    from pydantic import ValidationError

    try:
        settings = ToolSettings()
    except ValidationError as exc:
        sys.exit(f"error: {_settings_problems(exc)}")
    args = _parser(settings).parse_args(argv)
    try:
        sys.exit(_run(args, settings))
    except KeyboardInterrupt:
        sys.exit(130)
    except ValidationError as exc:  # a GKT_* environment variable a service refused
        sys.exit(f"error: {_settings_problems(exc)}")


def _parser(settings: ToolSettings) -> argparse.ArgumentParser:
    from gkt_tools import ask
    from gkt_tools.bench import command as bench

    parser = _Parser(prog="gkt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, *, env: str = "") -> argparse.ArgumentParser:
        epilog = f"environment variables:\n{env}" if env else None
        return commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    command("gateway", "serve the gRPC API (python -m services.gateway)", env=_settings_help("gateway"))
    command("teacher", "run a teacher worker (python -m services.teacher)", env=_settings_help("teacher"))
    student = command(
        "student",
        "run a Celery student worker under a parent that restarts it if it dies "
        "(python -m services.student); it decodes up to $GKT_STUDENT_MAX_BATCH jobs together",
        env=_settings_help("student"),
    )
    student.add_argument(
        "--name", default="student", help="Celery node name; the host is appended (default: %(default)s)"
    )
    default_addr = _default_gateway_addr(settings)
    ask.add_arguments(
        command("ask", "ask a running gateway one question", env=f"{ask.ENV_HELP}\n{_STATE_HELP}"),
        default_addr=default_addr,
    )
    status_parser = command(
        "status",
        "which teachers and students are alive, queue depths, dead letters; exit status 1 when no teacher or "
        "no student is alive",
        env=f"{_REDIS_HELP}\n{_STATE_HELP}\n(without GKT_REDIS_URL: the Redis of the stack `gkt up` started)",
    )
    status_parser.add_argument("--json", action="store_true", help="print JSON, for scripts")
    command(
        "demo",
        "start the stack on the bundled models, ask three questions, stop",
        env=f"{_REDIS_HELP} (default: a private Redis)\n  GKT_* service settings apply (see README)",
    )
    command(
        "up",
        "start the stack in the background (state and logs in .gkt/); ports in use are replaced by free ones",
        env=f"{_REDIS_HELP} (default: a private Redis)\n  GKT_GATEWAY_ADDR, GKT_*_METRICS_PORT: the ports "
        f"to use (default 127.0.0.1:50051, 9101-9103)\n{_STATE_HELP}",
    )
    command("down", "stop the stack `gkt up` started", env=_STATE_HELP)
    evaluation = command(
        "eval",
        "the paper's evaluation (Table 2) on GSM8K, CSQA or AQuA",
        env=f"{ask.ENV_HELP}\n  GKT_DATA_DIR           the datasets (default of --data-dir)\n"
        "  GKT_MODEL_CACHE_DIR    offline: converted bundled models",
    )
    from gkt_tools.evaluation import add_arguments as add_eval_arguments

    add_eval_arguments(evaluation, default_addr=default_addr)
    bench.add_arguments(
        command(
            "bench",
            "load-test the stack; report in docs/benchmarks/",
            env="  GKT_* service settings apply to the stacks it starts (see README)",
        )
    )
    from gkt_tools import chaos

    chaos.add_arguments(
        command(
            "chaos",
            "break a local stack on purpose (the fault matrix) and report what the calls came to",
            env="  GKT_* service settings apply to the stacks it starts (GKT_TEACHER_MODEL, GKT_STUDENT_MODEL…)",
        )
    )
    command(
        "hash-key",
        "read an API key from standard input (or a prompt) and print its line for GKT_GATEWAY_API_KEYS_FILE",
    ).add_argument("key", nargs="?", help=argparse.SUPPRESS)
    probe = command("probe", "liveness check for Kubernetes probes", env=_REDIS_HELP)
    probe.add_argument("role", choices=["teacher"], help="the worker to check on this host")
    return parser


def _run(args: argparse.Namespace, settings: ToolSettings) -> int:
    if args.command == "gateway":
        from services.gateway.__main__ import main as gateway_main

        gateway_main()
    elif args.command == "teacher":
        from services.teacher.__main__ import main as teacher_main

        teacher_main()
    elif args.command == "student":
        from services.student.__main__ import main as student_main

        return student_main(["--name", args.name])
    elif args.command == "ask":
        from gkt_tools.ask import run as run_ask

        return run_ask(args, api_key=settings.api_key_value)
    elif args.command == "status":
        from gkt_tools.status import run as run_status

        return run_status(as_json=args.json, state_dir=settings.state_dir)
    elif args.command == "demo":
        from gkt_tools.demo import run as run_demo

        return run_demo(settings)
    elif args.command == "up":
        from gkt_tools.up import up

        return up(settings)
    elif args.command == "down":
        from gkt_tools.up import down

        return down(settings)
    elif args.command == "eval":
        from gkt_tools.evaluation import run as run_eval

        return run_eval(args, settings=settings)
    elif args.command == "bench":
        from gkt_tools.bench.command import run as run_bench

        return run_bench(args, settings=settings)
    elif args.command == "chaos":
        from gkt_tools.chaos import run as run_chaos

        return run_chaos(args, settings=settings)
    elif args.command == "hash-key":
        return _hash_key(args.key)
    elif args.command == "probe":
        from gkt.config import CommonSettings

        return _probe_teacher(CommonSettings())
    return 0


def _settings_help(service: str) -> str:
    """Each environment variable a service reads, with its default and description."""
    from pydantic_settings import BaseSettings

    from gkt.config import variable_name
    from gkt.tracing import TracingSettings

    classes: list[type[BaseSettings]]
    if service == "gateway":
        from services.gateway.settings import GatewaySettings

        classes = [GatewaySettings]
    elif service == "teacher":
        from services.teacher.settings import TeacherServerSettings, TeacherSettings

        classes = [TeacherSettings, TeacherServerSettings]
    else:
        from services.student.settings import StudentServerSettings, StudentSettings

        classes = [StudentSettings, StudentServerSettings]
    classes.append(TracingSettings)
    lines = []
    for cls in classes:
        for name, info in cls.model_fields.items():
            default = "" if info.is_required() or info.default_factory else f" (default: {info.default})"
            lines.append(f"  {variable_name(cls, name)}{default}\n      {info.description}")
    return "\n".join(lines)


def _default_gateway_addr(settings: ToolSettings) -> str:
    """$GKT_GATEWAY_ADDR, else the gateway of the stack `gkt up` started here, else the usual port."""
    from gkt_tools.stack import read_detached

    record = read_detached(settings.state_dir)
    return settings.gateway_addr or (record or {}).get("gateway") or DEFAULT_GATEWAY_ADDR


def _hash_key(key_on_command_line: str | None) -> int:
    """The keys-file line of a key read from standard input or a prompt, never from argv (which other users
    see in the process list, and shell history keeps)."""
    from services.gateway.auth import hash_key

    if key_on_command_line is not None:
        print(
            "error: gkt hash-key does not take the key on the command line (other users can see it there, "
            "and shell history keeps it): pipe it in, e.g. `gkt hash-key < key.txt`, or type it at the prompt",
            file=sys.stderr,
        )
        return 2
    try:
        key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.readline()
    except EOFError:
        key = ""
    key = key.strip()
    if not key:
        print("error: no key given (an empty line)", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def _probe_teacher(settings: CommonSettings) -> int:
    """0 when a teacher on this host wrote its heartbeat in the last minute."""
    from gkt.connections import connect
    from gkt.keys import Keys
    from gkt.liveness import HEARTBEAT_TTL_S, parse_heartbeat

    keys = Keys(settings.key_prefix)
    redis = connect(settings.redis_url, socket_timeout=3)
    pattern = keys.heartbeat("teacher", f"{socket.gethostname()}-*")
    for key in redis.scan_iter(match=pattern):
        beat = redis.get(key)
        if beat and time.time() - parse_heartbeat(beat)[0] < HEARTBEAT_TTL_S:
            return 0
    print(f"no fresh teacher heartbeat ({pattern})", file=sys.stderr)
    return 1


def _settings_problems(exc: ValidationError) -> str:
    """`GKT_NAME: what is wrong` for each refused setting (never its value, which may be a secret)."""
    problems = []
    for error in exc.errors():
        name = "_".join(str(part) for part in error["loc"]).upper()
        problems.append(f"GKT_{name}: {error['msg']}" if name else error["msg"])
    return "; ".join(problems)


if __name__ == "__main__":
    main()
