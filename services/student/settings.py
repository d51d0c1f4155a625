"""The student workers' settings (`GKT_STUDENT_*` and the common `GKT_*`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from gkt.config import CommonSettings


class StudentSettings(CommonSettings):
    """Which student model, and the limits a job runs under."""

    student_model: str = Field(
        default="smollm2-135m-instruct",
        min_length=1,
        description="Bundled alias, Hugging Face id or directory.",
    )
    student_device: str = Field(default="cpu", description="torch device.")
    student_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Weights dtype."
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
