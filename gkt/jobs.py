"""Jobs and events: the plain data that travels between gateway, teacher and students."""

from __future__ import annotations

import enum
import time
import uuid
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from gkt import paper
from gkt.errors import StatusCode
from gkt.paper import GuidanceMode, Task

_FREEFORM = paper.TASK_DEFAULTS[Task.FREEFORM]


class JobKind(enum.StrEnum):
    """`generate` runs teacher then student; `guide` stops after the guidance."""

    GENERATE = "generate"
    GUIDE = "guide"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SamplingParams(_Frozen):
    """One job's own student sampling settings (temperature 0 means greedy); the seed also seeds the
    teacher's sampling of the job's guidance. Defaults: the paper's, with a free-form question's length."""

    temperature: float = Field(default=paper.STUDENT_TEMPERATURE, ge=0.0, le=5.0)
    top_p: float = Field(default=paper.STUDENT_TOP_P, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    max_new_tokens: int = Field(default=_FREEFORM.student_max_new_tokens, ge=1)
    seed: int = Field(default=0, ge=0)
    stop: tuple[str, ...] = ()
    repetition_penalty: float = Field(default=1.0, gt=0.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GuidanceSpec(_Frozen):
    """What guidance the teacher should produce for a job: `mode`, and N, its length in teacher tokens."""

    # In job JSON the length is still called `max_tokens`, so workers and gateways of the previous release
    # read each other's jobs; both names are accepted when a spec is read.
    model_config = ConfigDict(frozen=True, extra="forbid", serialize_by_alias=True)

    mode: GuidanceMode = GuidanceMode.CUTOFF
    max_guidance_tokens: int = Field(
        default=_FREEFORM.max_guidance_tokens,
        ge=1,
        validation_alias=AliasChoices("max_guidance_tokens", "max_tokens"),
        serialization_alias="max_tokens",
    )


class Job(_Frozen):
    """One query, as accepted by the gateway."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    kind: JobKind = JobKind.GENERATE
    request_id: str = ""
    query: str
    task: Task = Task.FREEFORM
    guidance: GuidanceSpec = GuidanceSpec()
    sampling: SamplingParams = SamplingParams()
    enqueued_at: float = Field(default_factory=time.time)
    deadline: float | None = None
    """Absolute epoch seconds after which nobody is waiting for the answer."""
    traceparent: str = Field(default="", pattern=r"^(|[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2})$")
    """W3C trace context of the gateway's span, so teacher and student spans join the job's trace."""

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now if now is not None else time.time()) > self.deadline


class Guidance(_Frozen):
    """The teacher's output for one job, as published to the job's event stream."""

    text: str
    token_count: int = Field(ge=0)
    finish_reason: str = "length"
    batch_size: int = Field(default=0, ge=0)
    dequeued_at: float = 0.0
    teacher_seconds: float = 0.0
    published_at: float = 0.0


class GuidanceEvent(_Frozen):
    type: Literal["guidance"] = "guidance"
    guidance: Guidance


class DeltaEvent(_Frozen):
    """A piece of student text; `offset` is its start in the student's continuation."""

    type: Literal["delta"] = "delta"
    text: str
    offset: int = Field(ge=0)
    attempt: int = 1


class Completion(_Frozen):
    """The final answer of a job."""

    text: str
    """The whole answer: guidance followed by the student's continuation."""
    guidance: Guidance
    answer: str = ""
    completion_tokens: int = 0
    finish_reason: str = "stop"
    seed: int = 0
    student_started_at: float = 0.0
    student_seconds: float = 0.0
    finished_at: float = Field(default_factory=time.time)


class FinalEvent(_Frozen):
    type: Literal["final"] = "final"
    completion: Completion


class ErrorEvent(_Frozen):
    """A job failed with `code`; a code outside `StatusCode` is refused when the event is built or read."""

    type: Literal["error"] = "error"
    code: StatusCode
    message: str
    field: str = ""
    """For `INVALID_ARGUMENT`: the request field at fault (dotted path, as in the proto)."""


Event = Annotated[GuidanceEvent | DeltaEvent | FinalEvent | ErrorEvent, Field(discriminator="type")]


class _EventEnvelope(BaseModel):
    event: Event


def encode_event(event: GuidanceEvent | DeltaEvent | FinalEvent | ErrorEvent) -> str:
    return event.model_dump_json()


def decode_event(raw: str | bytes) -> GuidanceEvent | DeltaEvent | FinalEvent | ErrorEvent:
    return _EventEnvelope.model_validate_json(b'{"event":' + _as_bytes(raw) + b"}").event


def _as_bytes(raw: str | bytes) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode()
