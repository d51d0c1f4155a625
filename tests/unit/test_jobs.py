"""Events survive their trip through Redis as JSON."""

from __future__ import annotations

from gkt.errors import StatusCode
from gkt.jobs import (
    Completion,
    DeltaEvent,
    ErrorEvent,
    FinalEvent,
    Guidance,
    GuidanceEvent,
    decode_event,
    encode_event,
)

GUIDANCE = Guidance(
    text="There are 15 trees", token_count=5, batch_size=3, dequeued_at=1.0, teacher_seconds=0.2
)


def test_every_event_kind_round_trips() -> None:
    events: list[GuidanceEvent | DeltaEvent | FinalEvent | ErrorEvent] = [
        GuidanceEvent(guidance=GUIDANCE),
        DeltaEvent(text=" originally", offset=0, attempt=2),
        FinalEvent(
            completion=Completion(text="There are 15 trees originally.", guidance=GUIDANCE, answer="15")
        ),
        ErrorEvent(code=StatusCode.DEADLINE_EXCEEDED, message="too late"),
    ]
    for event in events:
        assert decode_event(encode_event(event)) == event
        assert decode_event(encode_event(event).encode()) == event
