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
    GuidanceSpec,
    Job,
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


# A job exactly as the previous release's gateway wrote it, where the guidance length was `max_tokens`.
PREVIOUS_RELEASE_JOB = (
    '{"id":"0123456789abcdef0123456789abcdef","kind":"generate","request_id":"r-1","query":"How many?",'
    '"task":"gsm8k","guidance":{"mode":"hint","max_tokens":7},"sampling":{"temperature":0.0,"top_p":0.95,'
    '"top_k":0,"max_new_tokens":300,"seed":42,"stop":["END"],"repetition_penalty":1.0},'
    '"enqueued_at":1700000000.5,"deadline":1700000300.5,"traceparent":""}'
)


def test_jobs_of_the_previous_release_read_and_write_back_byte_for_byte() -> None:
    job = Job.model_validate_json(PREVIOUS_RELEASE_JOB)
    assert job.guidance.max_guidance_tokens == 7
    assert job.model_dump_json() == PREVIOUS_RELEASE_JOB
    assert GuidanceSpec(max_guidance_tokens=7) == GuidanceSpec.model_validate({"max_tokens": 7})
