"""The `tgi` backend over real HTTP against a server that follows TGI's published API.

TGI itself cannot run here (no GPU, no model hub), so these tests start `FakeInferenceServer`, which
serves TGI's documented routes and validation rules on 127.0.0.1; every request the backend sends and
every reply the server gives is checked against TGI's OpenAPI document (GenerateRequest,
GenerateResponse, Info, ErrorResponse). No client library is mocked: `huggingface_hub`'s
AsyncInferenceClient talks HTTP to that server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest

from gkt.errors import Unavailable
from services.teacher.backends.base import BackendError, GenerationRequest, GenerationResult
from services.teacher.backends.tgi import TgiBackend
from services.teacher.settings import TeacherServerSettings
from tests.integration.fake_inference_server import (
    Reply,
    ServerFactory,
    fast_teacher_settings,
    free_port,
)

pytestmark = pytest.mark.asyncio

STOP = "\nQ:"


def settings_for(url: str, **overrides: Any) -> TeacherServerSettings:
    """Small timeouts and backoff so failure paths take milliseconds."""
    return fast_teacher_settings(url, **overrides)


@asynccontextmanager
async def running(settings: TeacherServerSettings) -> AsyncIterator[TgiBackend]:
    backend = TgiBackend(settings=settings)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


def ask(
    question: str, *, max_guidance_tokens: int = 40, temperature: float = 0.8, **kw: Any
) -> GenerationRequest:
    return GenerationRequest(
        prompt=f"Q: {question}\nA:",
        max_guidance_tokens=max_guidance_tokens,
        temperature=temperature,
        stop=(STOP,),
        **kw,
    )


def failed(result: GenerationResult | BackendError) -> BackendError:
    assert isinstance(result, BackendError), f"expected a failure, got {result}"
    return result


def succeeded(result: GenerationResult | BackendError) -> GenerationResult:
    assert isinstance(result, GenerationResult), f"expected a result, got {result!r}"
    return result


async def test_batch_gets_guidance_cut_before_stop_with_server_token_counts(
    servers: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = servers()
    caplog.set_level(logging.INFO)
    async with running(settings_for(server.url)) as backend:
        results = await backend.generate_batch(
            [
                ask("apples", seed=7, top_p=0.9),
                ask("pears", max_guidance_tokens=3),
                GenerationRequest(prompt="Q: plums\nA:", max_guidance_tokens=40, temperature=0.0),
            ]
        )

    stop, length, eos = (succeeded(r) for r in results)
    assert stop == GenerationResult(
        text=" apples is easy. The answer is 42.", token_count=8, finish_reason="stop"
    )
    assert length == GenerationResult(text=" pears is easy.", token_count=3, finish_reason="length")
    assert eos.finish_reason == "eos" and eos.token_count == 11 and eos.text.startswith(" plums is easy.")

    sent = {e.request_json["inputs"]: e.request_json["parameters"] for e in server.generation_requests()}
    sampled = sent["Q: apples\nA:"]
    assert sampled | {"details": True, "do_sample": True, "seed": 7, "stop": [STOP], "top_p": 0.9} == sampled
    assert sampled["max_new_tokens"] == 40 and sampled["temperature"] == 0.8
    greedy = sent["Q: plums\nA:"]
    assert greedy["do_sample"] is False and "temperature" not in greedy and "top_p" not in greedy
    assert backend.concurrency == 100  # the server allows 128; huggingface_hub pools 100 connections
    ready = next(r for r in caplog.records if r.getMessage() == "tgi backend ready")
    assert ready.__dict__["model_id"] == "fake-org/teacher-13b" and ready.__dict__["max_total_tokens"] == 2048


@pytest.mark.parametrize(("setting", "server_limit", "expected"), [(0, 3, 3), (2, 8, 2)])
async def test_batch_is_sent_as_overlapping_requests_bounded_by_concurrency(
    servers: ServerFactory, setting: int, server_limit: int, expected: int
) -> None:
    server = servers(
        info={"max_concurrent_requests": server_limit}, hold_until_in_flight=expected, generation_delay_s=0.02
    )
    async with running(settings_for(server.url, max_concurrency=setting)) as backend:
        results = await backend.generate_batch([ask(f"fruit {i}") for i in range(3 * expected)])
    assert all(isinstance(r, GenerationResult) for r in results)
    assert backend.concurrency == expected
    assert server.max_in_flight == expected


async def test_validation_error_is_invalid_argument_not_retried_and_spares_batch_mates(
    servers: ServerFactory,
) -> None:
    server = servers(info={"max_input_tokens": 20, "max_total_tokens": 60})
    async with running(settings_for(server.url)) as backend:
        long, short = await backend.generate_batch([ask("why " * 30), ask("kiwis")])
    error = failed(long)
    assert (error.code, error.kind, error.field) == ("INVALID_ARGUMENT", "invalid", "query")
    assert "less than 20 tokens" in error.message
    assert len(server.generation_requests("why why")) == 1
    assert succeeded(short).text == " kiwis is easy. The answer is 42."


async def test_overloaded_429_is_retried_with_backoff_then_succeeds(servers: ServerFactory) -> None:
    server = servers()
    server.script("busy", Reply(status=429), Reply(status=429, headers={"Retry-After": "0"}))
    async with running(settings_for(server.url)) as backend:
        [result] = await backend.generate_batch([ask("busy day")])
    assert succeeded(result).finish_reason == "stop"
    assert [e.status for e in server.generation_requests("busy")] == [429, 429, 200]


async def test_429_that_persists_is_resource_exhausted(servers: ServerFactory) -> None:
    server = servers()
    server.script("busy", *[Reply(status=429)] * 3)
    async with running(settings_for(server.url, max_retries=2)) as backend:
        [result] = await backend.generate_batch([ask("busy day")])
    assert (failed(result).code, failed(result).kind) == ("RESOURCE_EXHAUSTED", "overloaded")
    assert "Model is overloaded" in failed(result).message
    assert len(server.generation_requests("busy")) == 3


async def test_503_is_retried_then_unavailable(servers: ServerFactory) -> None:
    server = servers()
    server.script("down", *[Reply(status=503)] * 4)
    async with running(settings_for(server.url)) as backend:
        [result, fine] = await backend.generate_batch([ask("down stream"), ask("figs")])
    assert (failed(result).code, failed(result).kind) == ("UNAVAILABLE", "overloaded")
    assert len(server.generation_requests("down")) == 4
    assert succeeded(fine).finish_reason == "stop"


async def test_5xx_is_retried_and_a_dropped_connection_too(servers: ServerFactory) -> None:
    server = servers()
    server.script("flaky", Reply(status=500), Reply(drop=True))
    async with running(settings_for(server.url)) as backend:
        [result] = await backend.generate_batch([ask("flaky wifi")])
    assert succeeded(result).token_count == 8
    # one attempt answered 500, one lost its connection, the third was answered
    flaky = server.generation_requests("flaky")
    assert [e.status for e in flaky] == [500, 200, 200] and flaky[1].response_json is None


async def test_timeout_fails_only_the_slow_request_and_is_not_retried(servers: ServerFactory) -> None:
    server = servers()
    server.script("slow", Reply(delay_s=5.0))
    async with running(settings_for(server.url, request_timeout_s=0.3)) as backend:
        started = time.monotonic()
        slow, quick = await backend.generate_batch([ask("slow snail"), ask("fast hare")])
        elapsed = time.monotonic() - started
    assert (failed(slow).code, failed(slow).kind) == ("UNAVAILABLE", "timeout")
    assert succeeded(quick).finish_reason == "stop"
    assert elapsed < 1.5
    assert len(server.generation_requests("slow")) == 1


@pytest.mark.parametrize(
    "body", [b'{"generated_text": "half', {"generated_text": " no details"}], ids=["unparsable", "no-details"]
)
async def test_malformed_reply_is_internal_and_not_retried(servers: ServerFactory, body: Any) -> None:
    server = servers()
    server.script("odd", Reply(body=body))
    async with running(settings_for(server.url)) as backend:
        [result] = await backend.generate_batch([ask("odd one")])
    assert (failed(result).code, failed(result).kind) == ("INTERNAL", "malformed")
    assert len(server.generation_requests("odd")) == 1


async def test_dead_server_opens_the_breaker_and_jobs_fail_fast(servers: ServerFactory) -> None:
    server = servers()
    async with running(settings_for(server.url, breaker_failures=3, breaker_reset_s=30)) as backend:
        server.stop()
        results = await backend.generate_batch([ask(f"lost {i}") for i in range(6)])
        errors = [failed(r) for r in results]
        assert {e.code for e in errors} == {"UNAVAILABLE"}
        assert {e.kind for e in errors} <= {"connection", "circuit_open"}
        assert backend.resilience.breaker.state == "open"

        started = time.monotonic()
        [later] = await backend.generate_batch([ask("later")])
        assert time.monotonic() - started < 0.1
    assert failed(later).kind == "circuit_open"
    assert "circuit open" in failed(later).message and failed(later).code == "UNAVAILABLE"


async def test_breaker_lets_one_probe_through_after_reset_and_closes(servers: ServerFactory) -> None:
    server = servers()
    server.script("", *[Reply(status=500)] * 3)
    settings = settings_for(server.url, max_retries=0, breaker_failures=3, breaker_reset_s=0.2)
    async with running(settings) as backend:
        first = await backend.generate_batch([ask(f"pear {i}") for i in range(3)])
        assert {failed(r).kind for r in first} == {"server"}
        [refused] = await backend.generate_batch([ask("refused")])
        assert failed(refused).kind == "circuit_open"
        assert not server.generation_requests("refused")

        await asyncio.sleep(0.25)
        [probe] = await backend.generate_batch([ask("probe")])
    assert succeeded(probe).finish_reason == "stop"
    assert backend.resilience.breaker.state == "closed"


async def test_start_refuses_a_server_that_is_down() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(Unavailable, match=r"GET /info failed.*GKT_TEACHER_URL"):
        await TgiBackend(settings=settings_for(url)).start()


async def test_start_refuses_an_unhealthy_server(servers: ServerFactory) -> None:
    server = servers()
    server.healthy = False
    with pytest.raises(Unavailable, match="unhealthy"):
        await TgiBackend(settings=settings_for(server.url)).start()


async def test_start_refuses_concurrency_above_the_server_limit(servers: ServerFactory) -> None:
    server = servers(info={"max_concurrent_requests": 4})
    with pytest.raises(ValueError, match=r"MAX_CONCURRENCY \(5\).*max_concurrent_requests \(4\)"):
        await TgiBackend(settings=settings_for(server.url, max_concurrency=5)).start()


async def test_check_limits_refuses_guidance_the_server_cannot_generate(servers: ServerFactory) -> None:
    server = servers(info={"max_input_tokens": 30, "max_total_tokens": 64})
    async with running(settings_for(server.url)) as backend:
        backend.check_limits(max_guidance_tokens=40)
        with pytest.raises(ValueError, match=r"max_guidance_tokens \(64\).*max_total_tokens is 64"):
            backend.check_limits(max_guidance_tokens=64)


async def test_api_key_from_file_is_sent_and_never_logged(
    servers: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = servers(api_key="s3cret-from-file")
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-from-file\n")
    caplog.set_level(logging.DEBUG)
    settings = settings_for(server.url, api_key="wrong-env-key", api_key_file=key_file)
    async with running(settings) as backend:
        [result] = await backend.generate_batch([ask("secret garden")])
    assert succeeded(result).finish_reason == "stop"
    assert {e.headers["authorization"] for e in server.exchanges} == {"Bearer s3cret-from-file"}
    assert "s3cret" not in caplog.text and "s3cret" not in repr(settings)


async def test_start_explains_that_hf_offline_mode_blocks_the_tgi_client(
    servers: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = servers()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="unset HF_HUB_OFFLINE"):
        await TgiBackend(settings=settings_for(server.url)).start()
