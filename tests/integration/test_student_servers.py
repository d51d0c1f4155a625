"""Student jobs streamed from an inference server (`openai` and `tgi` backends), through the real job logic:
claim, stream deltas to Redis, publish the final event or the error, release the lease.

vLLM and TGI cannot run here (no GPU, no model hub), so these tests start `FakeInferenceServer`, which
streams `/v1/completions` (`stream: true`) and `/generate_stream` as TGI's OpenAPI document publishes them;
every request the backends send and every event the server streams is checked against that document.
Nothing is mocked: the backends' HTTP clients talk to the server on 127.0.0.1. Its length is one test per
way a stream starts, breaks or is stopped, each run on both APIs, which share the fixtures at the top.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import HttpUrl
from redis import Redis

from gkt import leases
from gkt.jobs import DeltaEvent, ErrorEvent, FinalEvent, Guidance, GuidanceSpec, Job, SamplingParams
from gkt.keys import Keys
from gkt.publisher import SyncEventPublisher
from gkt.queue import AnyEvent
from services.student.backends.openai import OpenAIClient
from services.student.backends.remote import RemoteStudentBackend, ServerClient
from services.student.backends.tgi import TgiClient
from services.student.completion import JobLimits, run_job
from services.student.jobbook import JobBook
from services.student.settings import StudentServerSettings
from tests.events import job_events
from tests.integration.fake_inference_server import FakeInferenceServer, Reply, ServerFactory
from tests.waiting import until

KEYS = Keys("servers")
GUIDANCE = Guidance(text="Let us count:", token_count=3, published_at=1.0)
LIMITS = JobLimits(max_attempts=3, time_limit_s=60)
CLIENTS: dict[str, type[OpenAIClient] | type[TgiClient]] = {"openai": OpenAIClient, "tgi": TgiClient}
BackendFactory = Callable[..., RemoteStudentBackend]


@pytest.fixture(params=sorted(CLIENTS))
def api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backends(api: str) -> Iterator[BackendFactory]:
    """Started backends of the API under test, stopped at the end."""
    started: list[RemoteStudentBackend] = []

    def start(
        server: FakeInferenceServer, *, max_batch: int = 4, max_new_tokens: int = 256, **settings: Any
    ) -> RemoteStudentBackend:
        values: dict[str, Any] = {
            "url": server.url,
            "request_timeout_s": 5.0,
            "max_retries": 3,
            "backoff_base_s": 0.01,
            "backoff_max_s": 0.05,
            "breaker_failures": 50,
            "breaker_reset_s": 60.0,
        }
        client: ServerClient = CLIENTS[api](
            settings=StudentServerSettings(**(values | settings)), connections=max_batch
        )
        backend = RemoteStudentBackend(client)
        backend.start(max_new_tokens=max_new_tokens, max_batch=max_batch)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def publisher(redis: Redis) -> Iterator[SyncEventPublisher]:
    publisher = SyncEventPublisher(redis, keys=KEYS, ttl_s=600)
    publisher.watch_cancellations()
    until(lambda: redis.pubsub_numsub(KEYS.cancellations)[0][1] >= 1, what="the cancellation listener")
    yield publisher
    publisher.stop_watching()


@pytest.fixture
def book(redis: Redis) -> JobBook:
    return JobBook(redis, keys=KEYS, owner="student-1", lease_s=5, ttl_s=600)


def _job(question: str = "How many apples?", **sampling: Any) -> Job:
    params = SamplingParams(**{"temperature": 0.0, "max_new_tokens": 40, "seed": 1, **sampling})
    return Job(query=question, guidance=GuidanceSpec(max_guidance_tokens=3), sampling=params)


def _run(
    job: Job, backend: RemoteStudentBackend, publisher: SyncEventPublisher, book: JobBook, **kw: Any
) -> None:
    run_job(
        backend=backend,
        job=job,
        guidance=GUIDANCE,
        publisher=publisher,
        book=book,
        limits=kw.get("limits", LIMITS),
    )


def _events(redis: Redis, job: Job) -> list[AnyEvent]:
    return [event for _, event in job_events(redis, KEYS, job.id)]


def _error(redis: Redis, job: Job) -> ErrorEvent:
    last = _events(redis, job)[-1]
    assert isinstance(last, ErrorEvent), f"expected an error, got {last}"
    return last


def _sent(server: FakeInferenceServer, api: str) -> dict[str, Any]:
    (exchange,) = server.generation_requests()
    body = exchange.request_json
    return dict(body["parameters"]) if api == "tgi" else dict(body)


def test_a_job_streams_its_deltas_and_the_final_answer_continues_the_guidance(
    redis: Redis,
    servers: ServerFactory,
    backends: BackendFactory,
    publisher: SyncEventPublisher,
    book: JobBook,
) -> None:
    backend = backends(servers())
    job = _job()
    _run(job, backend, publisher, book)
    events = _events(redis, job)
    final = events[-1]
    assert isinstance(final, FinalEvent)
    deltas = "".join(e.text for e in events if isinstance(e, DeltaEvent))
    # the fake model's continuation, cut before the task's stop string "\nQ:"
    assert deltas == " apples is easy. The answer is 42."
    assert final.completion.text == GUIDANCE.text + deltas
    assert (final.completion.finish_reason, final.completion.completion_tokens) == ("stop", 7)
    assert leases.running(redis, keys=KEYS) == 0


def test_the_jobs_own_sampling_reaches_the_server_unchanged(
    api: str,
    redis: Redis,
    servers: ServerFactory,
    backends: BackendFactory,
    publisher: SyncEventPublisher,
    book: JobBook,
) -> None:
    server = servers()
    backend = backends(server)
    job = _job(
        temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.2, seed=11, max_new_tokens=30, stop=("42",)
    )
    _run(job, backend, publisher, book)
    sent = _sent(server, api)
    expected: dict[str, Any] = {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "repetition_penalty": 1.2,
        "seed": 11,
    }
    expected |= {"stop": ["\nQ:", "42"]}
    expected |= (
        {"max_new_tokens": 30, "do_sample": True} if api == "tgi" else {"max_tokens": 30, "stream": True}
    )
    assert sent | expected == sent
    final = _events(redis, job)[-1]
    assert isinstance(final, FinalEvent) and final.completion.text.endswith("The answer is ")


def test_a_greedy_job_asks_the_server_for_greedy_decoding(
    api: str,
    redis: Redis,
    servers: ServerFactory,
    backends: BackendFactory,
    publisher: SyncEventPublisher,
    book: JobBook,
) -> None:
    server = servers()
    _run(_job(temperature=0.0, seed=5), backends(server), publisher, book)
    sent = _sent(server, api)
    if api == "tgi":  # TGI refuses temperature 0: greedy is do_sample false, without the sampling knobs
        assert sent["do_sample"] is False and not {"temperature", "top_p", "top_k"} & set(sent)
    else:  # only what the job sets beyond the OpenAI API's own fields
        assert sent["temperature"] == 0.0 and not {"top_k", "repetition_penalty"} & set(sent)


def test_a_server_that_dies_mid_stream_fails_the_job_unavailable_without_a_second_try(
    redis: Redis,
    servers: ServerFactory,
    backends: BackendFactory,
    publisher: SyncEventPublisher,
    book: JobBook,
) -> None:
    server = servers()
    server.script("apples", Reply(drop_after_tokens=3))
    backend = backends(server)
    job = _job()
    _run(job, backend, publisher, book)
    error = _error(redis, job)
    assert error.code == "UNAVAILABLE" and "after 3 tokens" in error.message
    # what was shown stays shown: the tokens before the break were streamed
    assert "".join(e.text for e in _events(redis, job) if isinstance(e, DeltaEvent)) == " apples is easy."
    assert len(server.generation_requests()) == 1  # nothing is sent twice once text was shown
    assert leases.running(redis, keys=KEYS) == 0
    # the student goes on: the next job is answered
    later = _job("How many pears?")
    _run(later, backend, publisher, book)
    assert isinstance(_events(redis, later)[-1], FinalEvent)


def test_a_stream_that_breaks_before_its_first_token_is_retried(
    redis: Redis,
    servers: ServerFactory,
    backends: BackendFactory,
    publisher: SyncEventPublisher,
    book: JobBook,
) -> None:
    server = servers()
    server.script("apples", Reply(drop_after_tokens=0), Reply(drop=True))
    job = _job()
    _run(job, backends(server), publisher, book)
    assert isinstance(_events(redis, job)[-1], FinalEvent)
    assert len(server.generation_requests()) == 3


def test_a_429_and_503_storm_is_retried_and_the_job_answered(
    api: str,
    redis: Redis,
    servers: ServerFactory,
    backends: BackendFactory,
    publisher: SyncEventPublisher,
    book: JobBook,
) -> None:
    server = servers()
    server.script("apples", Reply(status=429), Reply(status=503), Reply(status=429))
    job = _job()
    _run(job, backends(server), publisher, book)
    assert isinstance(_events(redis, job)[-1], FinalEvent)
    assert len(server.generation_requests()) == 4  # three refused, then the one answered
    if api == "tgi":  # TGI's router sends its own overload as an event of a 200 stream
        overloaded = [e for e in server.generation_requests() if e.events and "error" in e.events[0]]
        assert [e.events[0]["error_type"] for e in overloaded] == ["overloaded", "overloaded"]


def test_a_storm_outlasting_the_retries_fails_the_job_and_opens_the_breaker(
    redis: Redis,
    servers: ServerFactory,
    backends: BackendFactory,
    publisher: SyncEventPublisher,
    book: JobBook,
) -> None:
    server = servers()
    server.script("apples", *[Reply(status=429)] * 4)
    server.script("pears", *[Reply(status=503)] * 4)
    backend = backends(server, max_retries=3, breaker_failures=4)
    overloaded, unavailable, fast = _job("How many apples?"), _job("How many pears?"), _job("How many plums?")
    counted = {kind: _failures(kind) for kind in ("overloaded", "circuit_open")}
    _run(overloaded, backend, publisher, book)
    assert (_error(redis, overloaded).code, "after 4 attempts" in _error(redis, overloaded).message) == (
        "RESOURCE_EXHAUSTED",
        True,
    )
    _run(unavailable, backend, publisher, book)
    assert _error(redis, unavailable).code == "UNAVAILABLE"
    # four 503s in a row opened the breaker: the next job fails at once, without reaching the server
    asked = len(server.generation_requests())
    _run(fast, backend, publisher, book)
    assert _error(redis, fast).code == "UNAVAILABLE" and "circuit open" in _error(redis, fast).message
    assert len(server.generation_requests()) == asked
    # each failed job counted once, by kind, in the students' metric
    assert {kind: _failures(kind) - before for kind, before in counted.items()} == {
        "overloaded": 2,
        "circuit_open": 1,
    }


def _failures(kind: str) -> float:
    return REGISTRY.get_sample_value("gkt_student_backend_errors_total", {"kind": kind}) or 0.0


def _run_in_thread(
    job: Job, backend: RemoteStudentBackend, publisher: SyncEventPublisher, book: JobBook
) -> threading.Thread:
    thread = threading.Thread(target=_run, args=(job, backend, publisher, book))
    thread.start()
    return thread


def test_a_cancel_mid_stream_closes_the_upstream_stream(
    redis: Redis,
    servers: ServerFactory,
    backends: BackendFactory,
    publisher: SyncEventPublisher,
    book: JobBook,
) -> None:
    server = servers(token_delay_s=0.3)  # 12 events: about 3.5 s to stream them all
    backend = backends(server)
    job = _job()
    running = _run_in_thread(job, backend, publisher, book)
    until(lambda: any(isinstance(e, DeltaEvent) for e in _events(redis, job)), what="the first delta")
    redis.publish(KEYS.cancellations, job.id)
    running.join(timeout=30)
    assert _error(redis, job).code == "CANCELLED"
    (exchange,) = server.generation_requests()
    index = server.exchanges.index(exchange)
    until(lambda: server.exchange(index).hung_up, what="the server to see the client hang up")
    assert len(server.exchange(index).events) < 8  # it stopped streaming well before the end


def test_a_deadline_mid_stream_closes_the_upstream_stream(
    redis: Redis,
    servers: ServerFactory,
    backends: BackendFactory,
    publisher: SyncEventPublisher,
    book: JobBook,
) -> None:
    server = servers(token_delay_s=0.3)
    backend = backends(server)
    job = _job().model_copy(update={"deadline": time.time() + 1.0})
    _run(job, backend, publisher, book)
    assert _error(redis, job).code == "DEADLINE_EXCEEDED"
    (exchange,) = server.generation_requests()
    index = server.exchanges.index(exchange)
    until(lambda: server.exchange(index).hung_up, what="the server to see the client hang up")


@pytest.mark.parametrize(
    ("question", "max_new_tokens", "field"),
    [("why " * 40, 10, "query"), ("How many apples?", 2000, "sampling.max_new_tokens")],
)
def test_a_request_the_server_refuses_is_invalid_argument_naming_the_field(
    redis: Redis,
    servers: ServerFactory,
    backends: BackendFactory,
    publisher: SyncEventPublisher,
    book: JobBook,
    question: str,
    max_new_tokens: int,
    field: str,
) -> None:
    server = servers(info={"max_input_tokens": 30, "max_total_tokens": 1100})
    job = _job(question, max_new_tokens=max_new_tokens)
    _run(job, backends(server), publisher, book)
    error = _error(redis, job)
    assert (error.code, error.field) == ("INVALID_ARGUMENT", field)
    assert len(server.generation_requests()) == 1  # a refused request is not retried


def test_start_refuses_a_server_that_cannot_generate_the_longest_completion(
    servers: ServerFactory, backends: BackendFactory
) -> None:
    server = servers(info={"max_total_tokens": 512})
    with pytest.raises(ValueError, match=r"GKT_STUDENT_MAX_NEW_TOKENS \(1024\).*512"):
        backends(server, max_new_tokens=1024)


def test_start_refuses_more_jobs_at_once_than_tgi_serves(servers: ServerFactory) -> None:
    server = servers(info={"max_concurrent_requests": 8})
    backend = RemoteStudentBackend(
        TgiClient(settings=StudentServerSettings(url=HttpUrl(server.url)), connections=16)
    )
    with pytest.raises(ValueError, match=r"GKT_STUDENT_MAX_BATCH \(16\).*max_concurrent_requests \(8\)"):
        backend.start(max_new_tokens=100, max_batch=16)


def test_one_process_keeps_many_jobs_streaming_at_once(
    redis: Redis,
    servers: ServerFactory,
    backends: BackendFactory,
    publisher: SyncEventPublisher,
    book: JobBook,
) -> None:
    server = servers(hold_until_in_flight=6, token_delay_s=0.01)
    backend = backends(server, max_batch=6)
    jobs = [_job(f"How many boxes of kind {i}?", seed=i) for i in range(6)]
    threads = [_run_in_thread(job, backend, publisher, book) for job in jobs]
    for thread in threads:
        thread.join(timeout=30)
    assert server.max_in_flight == 6
    for i, job in enumerate(jobs):
        final = _events(redis, job)[-1]
        assert isinstance(final, FinalEvent) and final.completion.text.startswith(
            f"{GUIDANCE.text} {i} is easy"
        )
