"""Status codes: one enumeration from the workers to the gateway, mapped to gRPC in one place, unchanged on
the wire so workers and gateways of the previous release understand each other."""

from __future__ import annotations

import grpc
import pytest
from pydantic import ValidationError

from gkt.errors import GktError, JobFailed, StatusCode
from gkt.jobs import ErrorEvent, decode_event, encode_event
from gkt.remote.errors import AttemptError
from services.gateway.errors import GRPC_STATUS, rich_status
from services.teacher.backends.base import BackendError

# Error events exactly as the previous release wrote them (its code was a plain string field): one per code
# its workers could send.
PREVIOUS_RELEASE_EVENTS = {
    "CANCELLED": '{"type":"error","code":"CANCELLED","message":"the client cancelled the job","field":""}',
    "INVALID_ARGUMENT": '{"type":"error","code":"INVALID_ARGUMENT","message":"too long","field":"query"}',
    "DEADLINE_EXCEEDED": '{"type":"error","code":"DEADLINE_EXCEEDED","message":"too late","field":""}',
    "RESOURCE_EXHAUSTED": '{"type":"error","code":"RESOURCE_EXHAUSTED","message":"HTTP 429","field":""}',
    "INTERNAL": '{"type":"error","code":"INTERNAL","message":"dead-lettered","field":""}',
    "UNAVAILABLE": '{"type":"error","code":"UNAVAILABLE","message":"circuit open","field":""}',
}


@pytest.mark.parametrize("wire", PREVIOUS_RELEASE_EVENTS.values(), ids=list(PREVIOUS_RELEASE_EVENTS))
def test_error_events_of_the_previous_release_read_and_write_back_byte_for_byte(wire: str) -> None:
    event = decode_event(wire)
    assert isinstance(event, ErrorEvent)
    assert isinstance(event.code, StatusCode)
    assert encode_event(event) == wire


def test_every_code_the_previous_release_sent_is_a_member() -> None:
    assert {code.value for code in StatusCode} >= set(PREVIOUS_RELEASE_EVENTS)


def test_an_unknown_code_cannot_be_constructed() -> None:
    with pytest.raises(ValidationError, match="code"):
        ErrorEvent.model_validate({"code": "UNAVALABLE", "message": "a typo"})
    with pytest.raises(ValidationError, match="code"):
        decode_event('{"type":"error","code":"NOT_A_CODE","message":"m","field":""}')
    with pytest.raises(ValueError, match="NOPE"):
        JobFailed("NOPE", "m")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NOPE"):
        BackendError("m", code="NOPE")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NOPE"):
        AttemptError("m", kind="server", code="NOPE")  # type: ignore[arg-type]


def test_every_code_maps_to_the_grpc_status_of_its_name() -> None:
    assert set(GRPC_STATUS) == set(StatusCode)
    for code, status in GRPC_STATUS.items():
        assert status.name == code.value
        assert rich_status(code, "m", []).code == status.value[0]


def test_every_client_error_class_carries_a_member() -> None:
    def subclasses(cls: type[GktError]) -> list[type[GktError]]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    for cls in subclasses(GktError):
        assert isinstance(cls.code, StatusCode), cls
    assert JobFailed(StatusCode.UNAVAILABLE, "m").code is StatusCode.UNAVAILABLE
    assert GRPC_STATUS[JobFailed(StatusCode.UNAVAILABLE, "m").code] == grpc.StatusCode.UNAVAILABLE
