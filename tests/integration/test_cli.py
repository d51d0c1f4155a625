"""The `gkt` command run as a user runs it, in a subprocess: one line for a mistake, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis import Redis

from gkt.jobs import Task
from gkt.keys import Keys
from gkt.liveness import heartbeat_value, teacher_pace
from gkt_tools.cli import _parser
from gkt_tools.processes import child_environment, free_port
from gkt_tools.settings import ToolSettings
from services.gateway.auth import hash_key
from services.gateway.server import Gateway
from services.gateway.settings import GatewaySettings
from tests.certificates import make_certificates
from tests.unit.test_evaluation import CSQA_LINES, write_data_dir

ROOT = Path(__file__).parents[2]
UNREACHABLE_HINT = "is the stack up? `make up`, or `--addr`"


def gkt(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gkt_tools.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_environment({"GKT_STATE_DIR": "/nonexistent-gkt-state", **(env or {})}),
        timeout=120,
    )


async def agkt(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`gkt` without blocking the event loop (a gateway of this test serves on it)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gkt_tools.cli", *args, cwd=ROOT,
        env=child_environment({"GKT_STATE_DIR": "/nonexistent-gkt-state", **(env or {})}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    return process.returncode or 0, out.decode(), err.decode()


def one_line_error(result: subprocess.CompletedProcess[str] | tuple[int, str, str]) -> str:
    stderr = result.stderr if isinstance(result, subprocess.CompletedProcess) else result[2]
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    return stderr.strip()


ASK = ("ask", "What is 2 + 2?")


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [(ASK, "--seed", "-1"), (ASK, "--guidance-tokens", "-5"), (ASK, "--max-new-tokens", "5000000000"),
     (ASK, "--top-p", "0"), (ASK, "--temperature", "nan"), (ASK, "--timeout", "0"), (ASK, "--seed", "seven"),
     (("eval",), "--limit", "-3"), (("eval",), "--batch-size", "0"), (("eval", "live"), "--timeout", "-1"), (("bench",), "--capacity-max-batch", "0"),
     (("bench",), "--requests", "0")],
)  # fmt: skip
def test_an_out_of_range_value_is_one_line_naming_the_option(
    command: tuple[str, ...], option: str, value: str
) -> None:
    result = gkt(*command, option, value)
    assert result.returncode == 2
    assert f"argument {option}" in one_line_error(result)


def test_an_unreachable_gateway_is_one_line_with_where_to_look() -> None:
    result = gkt("ask", "What is 2 + 2?", "--addr", f"127.0.0.1:{free_port()}", "--timeout", "10")
    assert result.returncode == 1
    assert UNREACHABLE_HINT in one_line_error(result)


def test_a_setting_a_service_refuses_is_one_line_naming_the_variable() -> None:
    result = gkt("teacher", env={"GKT_TEACHER_MAX_BATCH_SIZE": "0"})
    assert result.returncode == 1
    assert (
        one_line_error(result)
        == "error: GKT_TEACHER_MAX_BATCH_SIZE: Input should be greater than or equal to 1"
    )


def test_eval_live_against_an_unreachable_gateway_is_one_line(tmp_path: Path) -> None:
    data = write_data_dir(tmp_path / "data", Task.CSQA, CSQA_LINES)
    result = gkt("eval", "live", "--addr", f"127.0.0.1:{free_port()}", "--data-dir", str(data), "--limit", "1",
                 "--no-progress", "--out", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2
    assert UNREACHABLE_HINT in one_line_error(result)


def test_every_option_of_every_command_is_explained() -> None:
    subcommands = next(
        a for a in _parser(ToolSettings())._actions if isinstance(a, argparse._SubParsersAction)
    )
    commands: dict[str, argparse.ArgumentParser] = subcommands.choices
    unexplained = [
        f"gkt {name} {action.option_strings or action.dest}"
        for name, command in commands.items()
        for action in command._actions
        if not action.help
    ]
    assert not unexplained


@pytest.mark.parametrize("command", ["gateway", "teacher", "student", "ask", "status", "up", "eval", "probe"])
def test_help_names_the_environment_variables_a_command_reads(command: str) -> None:
    result = gkt(command, "--help")
    assert result.returncode == 0 and "environment variables:" in result.stdout
    assert "GKT_" in result.stdout.split("environment variables:")[1]


def test_hash_key_reads_the_key_from_standard_input_never_from_argv() -> None:
    result = gkt("hash-key", stdin="s3cret-key\n")
    assert result.returncode == 0 and result.stdout.strip() == hash_key("s3cret-key")
    refused = gkt("hash-key", "s3cret-key")
    assert refused.returncode == 2 and "pipe it in" in one_line_error(refused)
    assert "s3cret-key" not in refused.stderr + refused.stdout
    assert gkt("hash-key", stdin="\n").returncode == 2


def test_status_reports_workers_and_queues_and_fails_without_students(redis_url: str, redis: Redis) -> None:
    keys = Keys("status")
    now = time.time()
    redis.set(keys.heartbeat("teacher", "t-1"), heartbeat_value(at=now), ex=60)
    redis.hset(keys.teacher_pace, "t-1", teacher_pace(batch_s=1.5, max_batch_size=8, at=now))
    redis.xadd(keys.queries, {"job": "{}"}, id=f"{int((now - 30) * 1000)}-0")
    redis.xadd(keys.queries, {"job": "{}"})
    redis.xadd(keys.dead_letters, {"job": "{}", "reason": "test"})
    redis.rpush(keys.student_queue, "task-1", "task-2")  # under the prefix, apart from other tests' workers
    _check_status(redis, keys=keys, env={"GKT_REDIS_URL": redis_url, "GKT_KEY_PREFIX": "status"}, now=now)


def _check_status(redis: Redis, *, keys: Keys, env: dict[str, str], now: float) -> None:

    alone = gkt("status", env=env)
    assert alone.returncode == 1 and "no student is alive" in alone.stdout

    redis.set(keys.heartbeat("student", "s-1"), heartbeat_value(at=now, busy=1, capacity=1), ex=60)
    result = gkt("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert [(t["name"], t["batch_s"], t["max_batch_size"]) for t in status["teachers"]] == [("t-1", 1.5, 8)]
    assert [(s["name"], s["busy"], s["capacity"]) for s in status["students"]] == [("s-1", 1, 1)]
    assert status["queued_jobs"] == 2 and status["oldest_job_age_s"] >= 30
    assert status["student_tasks_waiting"] == 2 and status["dead_letters"] == 1 and status["healthy"]
    assert "t-1" in gkt("status", env=env).stdout


def test_status_finds_the_redis_of_the_stack_gkt_up_started_here(
    redis_url: str, redis: Redis, tmp_path: Path
) -> None:
    # The record `gkt up` leaves; this test's own pid stands in for the running gateway's.
    record = {
        "pids": {"gateway": os.getpid()},
        "gateway": "127.0.0.1:1",
        "metrics_ports": {},
        "redis": redis_url,
    }
    (tmp_path / "stack.json").write_text(json.dumps(record))
    redis.set(Keys("gkt").heartbeat("teacher", "t-here"), heartbeat_value(at=time.time()), ex=60)
    env = {k: v for k, v in child_environment().items() if k not in ("GKT_REDIS_URL", "GKT_KEY_PREFIX")}
    result = subprocess.run(
        [sys.executable, "-m", "gkt_tools.cli", "status", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, env={**env, "GKT_STATE_DIR": str(tmp_path)},
    )  # fmt: skip
    status = json.loads(result.stdout)
    assert status["redis"] == redis_url and [t["name"] for t in status["teachers"]] == ["t-here"]


def test_status_without_redis_is_one_line_with_where_to_look() -> None:
    result = gkt("status", env={"GKT_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert result.returncode == 2
    assert "is the stack up?" in one_line_error(result)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def tls_gateway(redis_url: str, certificates: Path, tmp_path: Path) -> AsyncIterator[str]:
    """A gateway that speaks only mutual TLS and wants an API key; no workers behind it."""
    keys = tmp_path / "keys"
    keys.write_text(f"{hash_key('good-key')}\n")
    addr = f"127.0.0.1:{free_port()}"
    settings = GatewaySettings(
        redis_url=redis_url, gateway_addr=addr, gateway_api_keys_file=keys, gateway_metrics_port=0,
        gateway_tls_cert_file=certificates / "server.pem", gateway_tls_key_file=certificates / "server.key",
        gateway_tls_client_ca_file=certificates / "ca.pem",
    )  # fmt: skip
    server = Gateway(settings)
    await server.start()
    yield addr
    await server.stop()


async def test_ask_speaks_mutual_tls_and_sends_the_api_key_from_the_environment(
    tls_gateway: str, certificates: Path, tmp_path: Path
) -> None:
    tls = ["--addr", tls_gateway, "--ca-file", str(certificates / "ca.pem"),
           "--cert-file", str(certificates / "client.pem"), "--key-file", str(certificates / "client.key")]  # fmt: skip
    # An empty query gets past TLS and the key check, into validation: INVALID_ARGUMENT.
    accepted = await agkt("ask", "", *tls, env={"GKT_API_KEY": "good-key"})
    assert accepted[0] == 1 and "INVALID_ARGUMENT" in one_line_error(accepted)
    key_file = tmp_path / "key"
    key_file.write_text("good-key\n")
    from_file = await agkt("ask", "", *tls, "--api-key-file", str(key_file), env={"GKT_API_KEY": "wrong"})
    assert "INVALID_ARGUMENT" in one_line_error(from_file)
    wrong_key = await agkt("ask", "", *tls, env={"GKT_API_KEY": "wrong-key"})
    assert "UNAUTHENTICATED" in one_line_error(wrong_key)
    plaintext = await agkt("ask", "", "--addr", tls_gateway, "--timeout", "10")
    assert plaintext[0] == 1 and UNREACHABLE_HINT in one_line_error(plaintext)


async def test_eval_live_speaks_tls_with_the_api_key_from_the_environment(
    tls_gateway: str, certificates: Path, tmp_path: Path
) -> None:
    data = write_data_dir(tmp_path / "data", Task.CSQA, CSQA_LINES)
    args = ["eval", "live", "--addr", tls_gateway, "--dataset", "csqa", "--data-dir", str(data), "--limit", "1",
            "--no-baselines", "--no-progress", "--timeout", "3", "--out", str(tmp_path / "out"),
            "--tls", "--ca-file", str(certificates / "ca.pem"),
            "--cert-file", str(certificates / "client.pem"), "--key-file", str(certificates / "client.key")]  # fmt: skip
    # No workers: past TLS and the key, the request waits in the queue until its deadline.
    accepted = await agkt(*args, env={"GKT_API_KEY": "good-key"})
    assert "DEADLINE_EXCEEDED" in accepted[2] or "RESOURCE_EXHAUSTED" in accepted[2], accepted[2]
    refused = await agkt(*args, env={"GKT_API_KEY": "wrong-key"})
    assert "UNAUTHENTICATED" in refused[2], refused[2]
