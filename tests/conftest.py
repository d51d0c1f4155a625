"""Fixtures shared by every test: a private Redis on a free port, tiny models, a whole stack."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from redis import Redis

from gkt_tools.processes import free_port
from tests.tiny_models import build_student, build_teacher

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def pytest_collection_finish(session: pytest.Session) -> None:
    """Convert the bundled models before the first test that loads them, outside every test's time limit:
    on a fresh machine the conversion alone takes minutes (more on a busy one), and a stack started in a
    test would spend them inside that test's timeout."""
    if session.config.option.collectonly or not any(
        item.get_closest_marker("real_models") for item in session.items
    ):
        return
    from gkt.config import CommonSettings
    from gkt.models import BUNDLED, load_tokenizer, needs_conversion

    cache = CommonSettings().model_cache_dir
    for name in BUNDLED:
        if needs_conversion(name=name, cache_dir=cache):
            started = time.monotonic()
            print(f"\nconverting the bundled model {name} into {cache} (first run only)…", flush=True)
            load_tokenizer(name=name, cache_dir=cache)
            print(f"converted {name} in {time.monotonic() - started:.0f} s", flush=True)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of our own (never the machine's shared one)."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with redis_server(tmp_path_factory.mktemp("redis"), url, "--port", str(port)):
        yield url


@contextlib.contextmanager
def redis_server(workdir: Path, url: str, *args: str) -> Iterator[None]:
    """Run redis-server with `args` (no persistence, loopback only) until `url` answers PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make setup` (scripts/ensure-redis.sh installs it)")
    process = subprocess.Popen(
        [binary, *args, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                Redis.from_url(url).ping()
                break
            except Exception:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    client = Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(teacher dir, student dir): random weights, different vocabularies."""
    root = tmp_path_factory.mktemp("tiny-models")
    return build_teacher(root / "teacher"), build_student(root / "student")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans recorded in memory while the test runs (skips where the `tracing` extra is missing)."""
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="the `tracing` extra is not installed")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gkt import tracing

    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)
