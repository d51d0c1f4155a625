"""The student workers' settings (`GKT_STUDENT_*` and the common `GKT_*`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gkt.config import CommonSettings
from gkt.remote.settings import RemoteServerSettings

BUNDLED_STUDENT = "smollm2-135m-instruct"
"""The model the local backend loads when GKT_STUDENT_MODEL is empty."""
REMOTE_BACKENDS = ("openai", "tgi")
"""The backends that stream from an inference server (`StudentServerSettings` says how)."""


class StudentSettings(CommonSettings):
    """Which student model, and the limits a job runs under."""

    student_backend: Literal["local", "openai", "tgi"] = Field(
        default="local",
        description="local: the model in this process; openai: an OpenAI-compatible completions server "
        "(vLLM, llama.cpp, TGI's /v1); tgi: TGI's /generate_stream. Remote ones read GKT_STUDENT_URL & co.",
    )
    student_model: str = Field(
        default="",
        max_length=256,
        description=f"The student model. local: a bundled alias, Hugging Face id or directory (empty: "
        f"{BUNDLED_STUDENT}); openai: the name the server serves it under (empty: the only model its "
        "/v1/models lists); tgi: unused (a TGI server serves one model).",
    )
    student_device: str = Field(default="cpu", description="torch device.")
    student_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Weights dtype."
    )
    student_max_new_tokens: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="Longest completion a job may ask for (keep it at GKT_GATEWAY_MAX_NEW_TOKENS): a model or "
        "server that cannot generate it beside a prompt is refused at start-up.",
    )
    student_task_time_limit_s: int = Field(
        default=300,
        ge=60,
        description="Longest generation of one job: past it the job fails with DEADLINE_EXCEEDED.",
    )
    student_max_attempts: int = Field(
        default=3, ge=1, le=20, description="Deliveries of one job (worker deaths included) before it fails."
    )
    student_max_batch: int = Field(
        default=16,
        ge=1,
        le=256,
        description="Jobs one student process decodes together (its Celery threads); 1 = one job at a time.",
    )
    student_redelivery_s: int = Field(
        default=15,
        ge=5,
        le=3600,
        description="A task a worker took from the queue but never started (it died first) returns to the "
        "queue after this long; a returning task whose job is running or answered is dropped by its claim.",
    )
    student_lease_s: float = Field(
        default=10.0,
        ge=2.0,
        le=300.0,
        description="A running job's lease: renewed every quarter of it; when its student dies, another "
        "takes the job over once it expires.",
    )
    student_metrics_port: int = Field(default=9103, ge=0, le=65535, description="Prometheus port (0 = off).")
    student_warmup: bool = Field(
        default=True, description="Run one tiny generation at start so job 1 is not slow."
    )
    student_prefix_cache: bool = Field(
        default=True, description="Prefill each task's few-shot prefix once and reuse its KV cache."
    )
    student_prepared_prompts: int = Field(
        default=32,
        ge=0,
        le=4096,
        description="Questions a local student keeps prefilled, prepared while the teacher writes their "
        "guidance (least recently used dropped first; about 2 x GKT_STUDENT_MAX_BATCH); 0 = none kept.",
    )
    student_stream_interval_ms: int = Field(
        default=20,
        ge=0,
        le=10_000,
        description="Token deltas are coalesced into one event (one Redis round trip) per this many ms.",
    )
    prometheus_multiproc_dir: Path | None = Field(
        default=None,
        validation_alias="PROMETHEUS_MULTIPROC_DIR",
        description="prometheus-client's multiprocess directory: the worker writes its metrics there and serves "
        "them; emptied before each worker starts. Unset: plain metrics.",
    )
    torch_threads: int = Field(
        default=0, ge=0, description="torch intra-op threads per process (0 = default)."
    )

    @property
    def local_model(self) -> str:
        """The model the local backend loads."""
        return self.student_model or BUNDLED_STUDENT


class StudentServerSettings(RemoteServerSettings):
    """How a student reaches its remote inference server (`openai` or `tgi` backend): `GKT_STUDENT_*`;
    which model it asks for is `StudentSettings.student_model`."""

    model_config = SettingsConfigDict(env_prefix="GKT_STUDENT_", extra="ignore", env_ignore_empty=True)

    request_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Longest wait for a stream's first token (retried until then), and for each next one.",
    )
