"""Structured JSON logs: one object a line, with the job's ids on every line about a job.

Three rules hold whatever a caller passes: the level comes from the settings (`GKT_LOG_LEVEL`);
what a user wrote or got back (query, prompt, text fields) appears only at DEBUG, for privacy; and
secrets (passwords, API keys, bearer tokens, URL credentials) never appear at all.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, Protocol

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
# Fields that carry what a user wrote or received: shown only at DEBUG.
PRIVATE_FIELDS = frozenset({"query", "prompt", "text", "guidance", "completion", "answer", "delta"})
_SECRET_FIELD = re.compile(r"(^|_)(password|passwd|secret|api_?key|authorization|bearer|credentials?)$", re.I)
_SECRET_TEXT = (
    (re.compile(r"(?<=://)([^:@/\s]*):([^@/\s]+)@"), r"\1:****@"),  # URL credentials
    (re.compile(r"(?i)(bearer\s+)[^\s\"',]+"), r"\1****"),  # Authorization header values
)
REDACTED = "****"

_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "gkt_log_context", default=MappingProxyType({})
)


class HasJobIds(Protocol):
    id: str
    request_id: str


def job_fields(job: HasJobIds) -> dict[str, str]:
    """The `extra` fields that tie a line to a job: its id, and the client's request id if it sent one."""
    fields = {"job_id": job.id}
    if job.request_id:
        fields["request_id"] = job.request_id
    return fields


@contextlib.contextmanager
def job_context(**fields: str) -> Iterator[None]:
    """Every line logged inside the block (in this thread or asyncio task) carries `fields`."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: str) -> None:
    """Add `fields` to every later line of the current asyncio task (each RPC runs in its own task)."""
    _context.set({**_context.get(), **{k: v for k, v in fields.items() if v}})


class JsonFormatter(logging.Formatter):
    """Renders a record, its `extra={...}` fields and the job context as JSON, private and secret parts removed."""

    def __init__(self, *, service: str = "") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact_text(record.getMessage()),
        }
        if self.service:
            line["service"] = self.service
        line.update(_context.get())
        shows_private = record.levelno <= logging.DEBUG
        for key, value in record.__dict__.items():
            if key in _RESERVED or (key in PRIVATE_FIELDS and not shows_private):
                continue
            line[key] = _redact_field(key, value)
        if record.exc_info:
            line["exc"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


def redact_text(text: str) -> str:
    """Mask URL credentials and bearer tokens inside free text."""
    for pattern, replacement in _SECRET_TEXT:
        text = pattern.sub(replacement, text)
    return text


def configure_logging(*, level: str, service: str) -> None:
    """JSON lines to stderr at `level`; chatty libraries stay at WARNING or above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service=service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    logging.getLogger("gkt").info("starting")


def _redact_field(key: str, value: Any) -> Any:
    if _SECRET_FIELD.search(key):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    return value
