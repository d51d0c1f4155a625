"""Every request the API can carry, thrown at a real gateway (real Redis, no teacher, short deadlines).

The property: an invalid request gets INVALID_ARGUMENT with a BadRequest naming a real request
field — the very field the gateway's own validation names — and a valid one is accepted and then
runs out of time (DEADLINE_EXCEEDED, as no teacher answers). Nothing else, and no crash.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gkt.errors import InvalidArgument
from gkt.jobs import JobKind
from gkt.v1 import guidance_pb2 as pb
from gkt_tools.processes import free_port
from services.gateway import convert
from services.gateway.server import Gateway
from services.gateway.settings import GatewaySettings

DEADLINE_S = 0.25
_EXAMPLES = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _field_paths(message: descriptor.Descriptor, prefix: str = "") -> set[str]:
    paths = set()
    for field in message.fields:
        paths.add(prefix + field.name)
        if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
            paths |= _field_paths(field.message_type, f"{prefix}{field.name}.")
    return paths


REQUEST_FIELDS = _field_paths(pb.GenerateRequest.DESCRIPTOR) | _field_paths(pb.GuideRequest.DESCRIPTOR)


@pytest.fixture(scope="module")
def gateway(redis_url: str) -> Iterator[GatewaySettings]:
    """A gateway on its own event loop in a thread, so hypothesis can drive it with a plain client."""
    gateway_settings = GatewaySettings(
        redis_url=redis_url,
        gateway_addr=f"127.0.0.1:{free_port()}",
        gateway_metrics_port=0,
        key_prefix="input-fuzz",
        gateway_max_queue_depth=1_000_000,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> Gateway:
        server = Gateway(gateway_settings)
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    yield gateway_settings
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def channel(gateway: GatewaySettings) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.gateway_addr) as opened:
        yield opened


# Each request is valid except for a few fields drawn from everything the wire allows (often none).
_VALID: dict[str, st.SearchStrategy[Any]] = {
    "query": st.from_regex(r"[A-Za-z0-9 ,.?]{0,60}[A-Za-z?]", fullmatch=True),
    "task": st.integers(0, 4),
    "guidance.mode": st.integers(0, 5),
    "guidance.max_guidance_tokens": st.one_of(st.none(), st.integers(1, 512)),
    "sampling.temperature": st.one_of(st.none(), st.floats(0, 5, width=32)),
    "sampling.top_p": st.one_of(st.none(), st.floats(0.125, 1, width=32)),
    "sampling.top_k": st.one_of(st.none(), st.integers(0, 1000)),
    "sampling.max_new_tokens": st.one_of(st.none(), st.integers(1, 1024)),
    "sampling.seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    "sampling.stop": st.lists(st.from_regex(r"[a-z.!]{1,10}", fullmatch=True), max_size=8),
    "sampling.repetition_penalty": st.one_of(st.none(), st.floats(0.125, 10, width=32)),
    "request_id": st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True)),
}
_text = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\x00", "a\x00b", "x" * 9000, "é🙂\n"]))
_floats = st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 5.0, 1.0]))
_uint32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 512, 513, 1024, 1025]))
_ANY: dict[str, st.SearchStrategy[Any]] = {
    "query": _text,
    "task": st.integers(-(2**31), 2**31 - 1),
    "guidance.mode": st.integers(-(2**31), 2**31 - 1),
    "guidance.max_guidance_tokens": st.one_of(st.none(), _uint32),
    "sampling.temperature": _floats,
    "sampling.top_p": _floats,
    "sampling.top_k": _uint32,
    "sampling.max_new_tokens": _uint32,
    "sampling.seed": st.integers(0, 2**64 - 1),
    "sampling.stop": st.lists(_text, max_size=12),
    "sampling.repetition_penalty": _floats,
    "request_id": st.text(max_size=140),
}


@st.composite
def _requests(draw: st.DrawFn, *, guide: bool) -> pb.GenerateRequest | pb.GuideRequest:
    names = [name for name in _VALID if not (guide and name.startswith("sampling."))]
    wild = draw(st.one_of(st.just(set()), st.sets(st.sampled_from(names), min_size=1, max_size=3)))
    values = {name: draw(_ANY[name] if name in wild else _VALID[name]) for name in names}
    request = pb.GuideRequest() if guide else pb.GenerateRequest()
    for name, value in values.items():
        if value is None:
            continue
        target: Any = request
        *parents, leaf = name.split(".")
        for parent in parents:
            target = getattr(target, parent)
        if isinstance(value, list):
            getattr(target, leaf).extend(value)
        else:
            setattr(target, leaf, value)
    return request


generate_requests = _requests(guide=False)
guide_requests = _requests(guide=True)


def _expected_field(
    request: pb.GenerateRequest | pb.GuideRequest, kind: JobKind, gateway: GatewaySettings
) -> str:
    """The field the gateway's validation names for this request, or "" if it accepts it."""
    try:
        convert.to_job(request, kind=kind, settings=gateway, timeout_s=DEADLINE_S)
    except InvalidArgument as exc:
        return exc.field
    return ""


def _check(call: Callable[[], Any], expected_field: str) -> None:
    event(f"invalid: {expected_field}" if expected_field else "valid")
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value
    if not expected_field:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
        return
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    field = bad_request.field_violations[0].field
    assert field in REQUEST_FIELDS and field == expected_field


@_EXAMPLES
@given(request=generate_requests, stream=st.booleans())
def test_generate_answers_only_invalid_argument_or_deadline_exceeded(
    channel: grpc.Channel, gateway: GatewaySettings, request: pb.GenerateRequest, stream: bool
) -> None:
    expected = _expected_field(request, JobKind.GENERATE, gateway)
    if stream:
        method = channel.unary_stream(
            "/gkt.v1.GuidanceService/GenerateStream", request_serializer=pb.GenerateRequest.SerializeToString
        )
        _check(lambda: list(method(request, timeout=DEADLINE_S)), expected)
    else:
        method = channel.unary_unary(
            "/gkt.v1.GuidanceService/Generate", request_serializer=pb.GenerateRequest.SerializeToString
        )
        _check(lambda: method(request, timeout=DEADLINE_S), expected)


@_EXAMPLES
@given(request=guide_requests)
def test_guide_answers_only_invalid_argument_or_deadline_exceeded(
    channel: grpc.Channel, gateway: GatewaySettings, request: pb.GuideRequest
) -> None:
    method = channel.unary_unary(
        "/gkt.v1.GuidanceService/Guide", request_serializer=pb.GuideRequest.SerializeToString
    )
    _check(lambda: method(request, timeout=DEADLINE_S), _expected_field(request, JobKind.GUIDE, gateway))


def _length_delimited(number: int, payload: bytes) -> bytes:
    assert number < 16 and len(payload) < 128  # one-byte tag and length keep the encoding simple
    return bytes([number << 3 | 2, len(payload)]) + payload


# A byte that can never start UTF-8 (or a lone surrogate), somewhere among arbitrary bytes.
_not_utf8 = (
    st.tuples(
        st.binary(max_size=10),
        st.sampled_from([b"\xff", b"\x80", b"\xc0", b"\xed\xa0\x80"]),
        st.binary(max_size=10),
    )
    .map(b"".join)
    .filter(lambda raw: not _is_utf8(raw))
)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@_EXAMPLES
@given(raw=_not_utf8, where=st.sampled_from(["query", "request_id", "sampling.stop"]))
def test_strings_that_are_not_utf8_are_invalid_argument_naming_the_field(
    channel: grpc.Channel, raw: bytes, where: str
) -> None:
    if where == "query":
        body = _length_delimited(1, raw)
    elif where == "request_id":
        body = _length_delimited(1, b"q") + _length_delimited(5, raw)
    else:
        body = _length_delimited(1, b"q") + _length_delimited(4, _length_delimited(6, raw))
    method = channel.unary_unary("/gkt.v1.GuidanceService/Generate", request_serializer=lambda data: data)
    _check(lambda: method(body, timeout=DEADLINE_S), where)
