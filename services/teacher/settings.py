"""The teacher worker's settings (`GKT_TEACHER_*` and the common `GKT_*`)."""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gkt import paper
from gkt.config import CommonSettings
from gkt.remote.settings import RemoteServerSettings

BUNDLED_TEACHER = "gemma-3-270m"
"""The model the local backend loads when GKT_TEACHER_MODEL is empty."""
REMOTE_BACKENDS = ("tgi", "openai")
"""The backends that call an inference server (`TeacherServerSettings` says how)."""


class TeacherSettings(CommonSettings):
    """How the teacher batches, which backend it calls, and its default sampling."""

    teacher_backend: Literal["local", "tgi", "openai", "echo-benchmark-only"] = Field(
        default="local",
        description="local: in-process transformers; tgi / openai: a remote inference server; "
        "echo-benchmark-only: no model at all, for measuring the serving path (never for real traffic).",
    )
    teacher_model: str = Field(
        default="",
        max_length=256,
        description=f"The teacher model. local: a bundled alias, Hugging Face id or directory (empty: "
        f"{BUNDLED_TEACHER}); openai: the name the server serves it under (empty: the only model its "
        "/v1/models lists); tgi: unused (a TGI server serves one model).",
    )
    teacher_device: str = Field(default="cpu", description="torch device for the local backend.")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Weights dtype for the local backend."
    )
    teacher_prefix_cache: bool = Field(
        default=True,
        description="local backend: prefill each task's few-shot prefix once and reuse its KV cache.",
    )
    teacher_pipeline: bool = Field(
        default=True,
        description="Keep up to teacher_max_in_flight jobs generating, admitting each new job as an earlier one "
        "finishes and publishing each job's guidance the moment it is ready; false = one batch at a time.",
    )
    teacher_prepare_students: bool = Field(
        default=True,
        description="When a job that needs a student starts generating, ask a student to prefill its question "
        "meanwhile (a Celery task), and send the job to that student when its guidance is ready.",
    )
    teacher_max_in_flight: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="Pipelined teacher: jobs generating at once; 0 = the backend's concurrency (the "
        "server's limit or GKT_TEACHER_MAX_CONCURRENCY for tgi/openai, the engine's rows for local).",
    )
    teacher_max_batch_size: int = Field(
        default=8,
        ge=1,
        le=512,
        description="Most jobs in one batch (one batch at a time); rows the local backend's engine decodes at once.",
    )
    teacher_max_wait_ms: int = Field(
        default=20,
        ge=0,
        le=10_000,
        description="One batch at a time: a batch closes this long after its first job arrived.",
    )
    teacher_temperature: float = Field(
        default=paper.TEACHER_TEMPERATURE,
        ge=0.0,
        le=5.0,
        description="Teacher sampling (0 = greedy), seeded by each job's seed.",
    )
    teacher_top_p: float = Field(
        default=paper.TEACHER_TOP_P, gt=0.0, le=1.0, description="Teacher nucleus sampling."
    )
    teacher_claim_idle_ms: int = Field(
        default=60_000,
        ge=1_000,
        description="Jobs a teacher held this long without acking are reclaimed even though its heartbeat "
        "goes on (a teacher that hangs).",
    )
    teacher_heartbeat_ttl_s: float = Field(
        default=10.0,
        ge=1.0,
        le=600.0,
        description="Lifetime of a teacher's heartbeat, renewed every third of it, generating or not: other "
        "teachers take over the jobs of one whose heartbeat expired (checked every 2 s at most).",
    )
    teacher_max_deliveries: int = Field(
        default=3,
        ge=1,
        le=100,
        description="A job delivered this many times without success is dead-lettered.",
    )
    teacher_name: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        min_length=1,
        description="Consumer name in the teachers' group (unique per worker).",
    )
    teacher_metrics_port: int = Field(default=9102, ge=0, le=65535, description="Prometheus port (0 = off).")
    torch_threads: int = Field(default=0, ge=0, description="torch intra-op threads (0 = torch's default).")

    @property
    def local_model(self) -> str:
        """The model the local backend loads."""
        return self.teacher_model or BUNDLED_TEACHER


class TeacherServerSettings(RemoteServerSettings):
    """How the teacher reaches its remote inference server (`tgi` or `openai` backend): `GKT_TEACHER_*`;
    which model it asks for is `TeacherSettings.teacher_model`."""

    model_config = SettingsConfigDict(env_prefix="GKT_TEACHER_", extra="ignore", env_ignore_empty=True)

    max_concurrency: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="Requests in flight; 0 = TGI's /info limit (tgi) or 32 (openai).",
    )
