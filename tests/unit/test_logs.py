"""JSON log lines: job ids on every line about a job, level by setting, no user text at INFO, no secrets."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from gkt import logs
from gkt.jobs import Job

log = logging.getLogger("gkt.test")


class Lines:
    """configure_logging() as a service calls it, with the handler's stream kept here to read back."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def configure(self, *, level: str, service: str = "teacher") -> None:
        logs.configure_logging(level=level, service=service)
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(self.stream)

    def __call__(self) -> list[dict[str, Any]]:
        """The lines written since the last call, parsed (each must be one JSON object)."""
        written, self.stream = self.stream.getvalue(), io.StringIO()
        logging.getLogger().handlers[0].setStream(self.stream)  # type: ignore[attr-defined]
        return [json.loads(line) for line in written.splitlines()]


@pytest.fixture
def lines() -> Iterator[Lines]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    reader = Lines()
    reader.configure(level="INFO")
    yield reader
    root.handlers[:], root.level = saved[0], saved[1]


def test_every_line_is_one_json_object_naming_its_service(lines: Lines) -> None:
    log.info("batch done", extra={"batch_size": 3})
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("failed")

    done, failed = lines()
    assert done["msg"] == "batch done" and done["level"] == "INFO" and done["service"] == "teacher"
    assert done["batch_size"] == 3
    assert failed["level"] == "ERROR" and "ValueError: bad" in failed["exc"]


def test_lines_inside_a_job_context_carry_its_ids_and_lines_after_do_not(lines: Lines) -> None:
    job = Job(query="q", request_id="req-7")
    with logs.job_context(**logs.job_fields(job)):
        log.warning("student job failed")
        logging.getLogger("celery.worker").warning("a library's line")
    log.info("idle")

    failed, library, idle = lines()
    for line in (failed, library):
        assert (line["job_id"], line["request_id"]) == (job.id, "req-7")
    assert "job_id" not in idle and "request_id" not in idle


def test_job_fields_leave_out_an_absent_request_id() -> None:
    job = Job(query="q", id="abc")
    assert logs.job_fields(job) == {"job_id": "abc"}


async def test_ids_bound_in_one_task_stay_in_that_task(lines: Lines) -> None:
    both_bound = asyncio.Barrier(2)

    async def rpc(job_id: str) -> None:
        logs.bind(job_id=job_id)
        await both_bound.wait()  # the other RPC has bound its own id by now
        log.info("job enqueued")

    await asyncio.gather(rpc("a" * 32), rpc("b" * 32))
    log.info("outside")

    *enqueued, outside = lines()
    assert sorted(line["job_id"] for line in enqueued) == ["a" * 32, "b" * 32]
    assert "job_id" not in outside


def test_the_level_comes_from_the_setting(lines: Lines) -> None:
    lines.configure(level="WARNING", service="gateway")
    log.info("hidden")
    log.warning("shown")

    assert [line["msg"] for line in lines()] == ["shown"]


def test_what_users_wrote_is_logged_only_at_debug(lines: Lines) -> None:
    lines.configure(level="DEBUG", service="gateway")
    log.info("job enqueued", extra={"query": "my private question", "task": "gsm8k"})
    log.debug("job enqueued", extra={"query": "my private question"})

    info, debug = lines()
    assert "query" not in info and info["task"] == "gsm8k"
    assert "my private question" not in json.dumps(info)
    assert debug["query"] == "my private question"


def test_secrets_never_reach_a_line(lines: Lines) -> None:
    log.info(
        "settings redis://app:hunter2@redis:6379/0",
        extra={
            "api_key": "sk-123",
            "redis_password": "hunter2",
            "header": "Bearer sk-456",
            "key_prefix": "gkt",
        },
    )
    try:
        raise ConnectionError("cannot reach rediss://:hunter2@redis:6380")
    except ConnectionError:
        log.exception("redis down")

    settings, down = lines()
    text = json.dumps([settings, down])
    for secret in ("hunter2", "sk-123", "sk-456"):
        assert secret not in text
    assert settings["msg"] == "settings redis://app:****@redis:6379/0"
    assert settings["api_key"] == settings["redis_password"] == logs.REDACTED
    assert settings["header"] == "Bearer ****"
    assert settings["key_prefix"] == "gkt"  # a field that merely contains "key" stays
