"""The `openai` backend over real HTTP against a server that follows the published completions API.

vLLM, SGLang and TGI cannot run here (no GPU, no model hub), so these tests start `FakeInferenceServer`,
which serves `/v1/completions` and `/v1/models` as TGI's OpenAPI document publishes them (plus vLLM's
`stop_reason` and model list); every request the backend sends is checked against CompletionRequest and
every reply against CompletionFinal / ModelInfo / ErrorResponse. Nothing is mocked: the backend's HTTP
client talks to that server on 127.0.0.1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import HttpUrl

from gkt.errors import Unavailable
from services.teacher.backends.base import BackendError, GenerationRequest, GenerationResult
from services.teacher.backends.openai import DEFAULT_CONCURRENCY, OpenAIBackend
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
    """Small timeouts and backoff so failure paths take milliseconds; no concurrency cap."""
    return fast_teacher_settings(url, **({"max_concurrency": 0} | overrides))


@asynccontextmanager
async def running(settings: TeacherServerSettings, *, model: str = "") -> AsyncIterator[OpenAIBackend]:
    backend = OpenAIBackend(settings=settings, model=model)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


def ask(
    question: str, *, max_guidance_tokens: int = 40, stop: tuple[str, ...] = (STOP,), **kw: Any
) -> GenerationRequest:
    return GenerationRequest(
        prompt=f"Q: {question}\nA:", max_guidance_tokens=max_guidance_tokens, temperature=0.8, stop=stop, **kw
    )


def failed(result: GenerationResult | BackendError) -> BackendError:
    assert isinstance(result, BackendError), f"expected a failure, got {result}"
    return result


def succeeded(result: GenerationResult | BackendError) -> GenerationResult:
    assert isinstance(result, GenerationResult), f"expected a result, got {result!r}"
    return result


async def test_batch_gets_guidance_and_usage_token_counts_from_the_only_served_model(
    servers: ServerFactory,
) -> None:
    server = servers(models=["teacher-70b"])
    async with running(settings_for(server.url)) as backend:
        results = await backend.generate_batch(
            [ask("apples", seed=7, top_p=0.9), ask("pears", max_guidance_tokens=3), ask("plums", stop=())]
        )
    assert backend.model == "teacher-70b" and backend.max_model_len == 2048

    stop, length, eos = (succeeded(r) for r in results)
    assert stop == GenerationResult(
        text=" apples is easy. The answer is 42.", token_count=8, finish_reason="stop"
    )
    assert length == GenerationResult(text=" pears is easy.", token_count=3, finish_reason="length")
    assert eos.finish_reason == "eos" and eos.token_count == 11

    sent = {e.request_json["prompt"][0]: e.request_json for e in server.generation_requests()}
    apples = sent["Q: apples\nA:"]
    expected = {
        "model": "teacher-70b",
        "max_tokens": 40,
        "temperature": 0.8,
        "top_p": 0.9,
        "seed": 7,
        "stop": [STOP],
    }
    assert apples | expected == apples
    assert "stop" not in sent["Q: plums\nA:"]


async def test_finish_reason_without_vllm_stop_reason_follows_the_request(servers: ServerFactory) -> None:
    server = servers(stop_reason_field=False, models_format="absent")
    async with running(settings_for(server.url), model="gpt-3.5-turbo-instruct") as backend:
        with_stop, without_stop = await backend.generate_batch([ask("figs"), ask("dates", stop=())])
    assert succeeded(with_stop).finish_reason == "stop"
    assert succeeded(without_stop).finish_reason == "eos"
    assert {e.request_json["model"] for e in server.generation_requests()} == {"gpt-3.5-turbo-instruct"}


@pytest.mark.parametrize(("setting", "expected"), [(4, 4), (0, DEFAULT_CONCURRENCY)])
async def test_batch_is_sent_as_overlapping_requests_bounded_by_concurrency(
    servers: ServerFactory, setting: int, expected: int
) -> None:
    server = servers(hold_until_in_flight=expected, generation_delay_s=0.02)
    async with running(settings_for(server.url, max_concurrency=setting)) as backend:
        results = await backend.generate_batch([ask(f"fruit {i}") for i in range(2 * expected)])
    assert all(isinstance(r, GenerationResult) for r in results)
    assert backend.concurrency == expected
    assert server.max_in_flight == expected


async def test_validation_error_is_invalid_argument_not_retried_and_spares_batch_mates(
    servers: ServerFactory,
) -> None:
    server = servers(info={"max_input_tokens": 20, "max_total_tokens": 60})
    async with running(settings_for(server.url)) as backend:
        long, short = await backend.generate_batch([ask("why " * 30), ask("kiwis")])
    assert (failed(long).code, failed(long).kind, failed(long).field) == (
        "INVALID_ARGUMENT",
        "invalid",
        "query",
    )
    assert "less than 20 tokens" in failed(long).message
    assert len(server.generation_requests("why why")) == 1
    assert succeeded(short).text == " kiwis is easy. The answer is 42."


async def test_overloaded_429_is_retried_then_succeeds(servers: ServerFactory) -> None:
    server = servers()
    server.script("busy", Reply(status=429, headers={"Retry-After": "0"}), Reply(status=429))
    async with running(settings_for(server.url)) as backend:
        [result] = await backend.generate_batch([ask("busy day")])
    assert succeeded(result).finish_reason == "stop"
    assert [e.status for e in server.generation_requests("busy")] == [429, 429, 200]


async def test_503_is_retried_then_unavailable(servers: ServerFactory) -> None:
    server = servers()
    server.script("down", *[Reply(status=503)] * 4)
    async with running(settings_for(server.url)) as backend:
        [result] = await backend.generate_batch([ask("down stream")])
    assert (failed(result).code, failed(result).kind) == ("UNAVAILABLE", "overloaded")
    assert "after 4 attempts" in failed(result).message
    assert len(server.generation_requests("down")) == 4


async def test_timeout_fails_only_the_slow_request(servers: ServerFactory) -> None:
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
    "body",
    [
        b"<html>502 Bad Gateway</html>",
        # Valid against CompletionFinal, yet no choice to read.
        {
            "id": "x",
            "object": "text_completion",
            "created": 0,
            "model": "m",
            "system_fingerprint": "f",
            "choices": [],
            "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1},
        },
    ],
    ids=["not-json", "no-choices"],
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
        errors = [failed(r) for r in await backend.generate_batch([ask(f"lost {i}") for i in range(6)])]
        started = time.monotonic()
        [later] = await backend.generate_batch([ask("later")])
        assert time.monotonic() - started < 0.1
    assert {e.kind for e in errors} <= {"connection", "circuit_open"} and "circuit_open" in {
        e.kind for e in errors
    }
    assert (failed(later).code, failed(later).kind) == ("UNAVAILABLE", "circuit_open")


async def test_start_refuses_a_server_that_is_down() -> None:
    with pytest.raises(Unavailable, match=r"GET /models failed.*GKT_TEACHER_URL"):
        await OpenAIBackend(settings=settings_for(f"http://127.0.0.1:{free_port()}")).start()


async def test_start_refuses_a_model_the_server_does_not_serve(servers: ServerFactory) -> None:
    server = servers(models=["a", "b"])
    with pytest.raises(ValueError, match=r"GKT_TEACHER_MODEL \('c'\) is not served.*\['a', 'b'\]"):
        await OpenAIBackend(settings=settings_for(server.url), model="c").start()
    with pytest.raises(ValueError, match="set GKT_TEACHER_MODEL"):
        await OpenAIBackend(settings=settings_for(server.url)).start()


async def test_tgi_model_info_and_a_v1_base_url_are_accepted(servers: ServerFactory) -> None:
    server = servers(models_format="tgi")
    async with running(settings_for(f"{server.url}/v1/")) as backend:
        [result] = await backend.generate_batch([ask("limes")])
    assert backend.model == "fake-org/teacher-13b"
    assert succeeded(result).finish_reason == "stop"


async def test_check_limits_uses_the_model_length_vllm_reports(servers: ServerFactory) -> None:
    server = servers(info={"max_input_tokens": 30, "max_total_tokens": 64})
    async with running(settings_for(server.url)) as backend:
        backend.check_limits(max_guidance_tokens=40)
        with pytest.raises(ValueError, match=r"max_guidance_tokens \(64\).*max_model_len 64"):
            backend.check_limits(max_guidance_tokens=64)


async def test_api_key_file_wins_over_the_environment_and_is_never_logged(
    servers: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = servers(api_key="sk-from-file")
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    monkeypatch.setenv("GKT_TEACHER_API_KEY", "sk-from-env")
    monkeypatch.setenv("GKT_TEACHER_API_KEY_FILE", str(key_file))
    caplog.set_level(logging.DEBUG)
    settings = TeacherServerSettings(url=HttpUrl(server.url), max_retries=0)
    async with running(settings) as backend:
        [result] = await backend.generate_batch([ask("secret garden")])
    assert succeeded(result).finish_reason == "stop"
    assert {e.headers["authorization"] for e in server.exchanges} == {"Bearer sk-from-file"}
    assert "sk-from" not in caplog.text and "sk-from" not in repr(settings)


async def test_a_rejected_api_key_stops_start_up(servers: ServerFactory) -> None:
    server = servers(api_key="right")
    with pytest.raises(ValueError, match="rejected the API key"):
        await OpenAIBackend(settings=settings_for(server.url, api_key="wrong")).start()
