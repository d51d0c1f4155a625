"""What the tools read from the environment (`GKT_*`): the `gkt` command's own settings, and the few settings
of a local stack's services that the stack runner must know before it starts them."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from gkt.config import CommonSettings

_REPO = Path(__file__).resolve().parents[1]


class ToolSettings(BaseSettings):
    """The `gkt` command's settings, built once by `gkt_tools.cli.main`."""

    # An empty variable means "not set", as it did when these were read by hand.
    model_config = SettingsConfigDict(env_prefix="GKT_", extra="ignore", frozen=True, env_ignore_empty=True)

    state_dir: Path = Field(
        default=Path(".gkt"),
        description="Where `gkt up` keeps its state and logs, and `gkt down` finds them.",
    )
    gateway_addr: str = Field(
        default="",
        description="The gateway `gkt ask` and `gkt eval live` call, and the address `gkt up` serves on "
        "(empty: the stack `gkt up` started here, else 127.0.0.1:50051).",
    )
    redis_url: str | None = Field(
        default=None,
        description="The Redis `gkt up` and `gkt demo` run the stack on (unset: a private one they start).",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="API key `gkt ask` and `gkt eval live` send as `authorization: Bearer` (unless "
        "--api-key-file is given).",
    )
    data_dir: Path | None = Field(
        default=None, description="The evaluation datasets (default: ../shared/data next to the repository)."
    )
    shared_ref_dir: Path = Field(
        default=_REPO.parent / "shared" / "ref",
        description="Reference documents the manifest checks read (the KEDA and Prometheus-operator CRDs).",
    )

    def data_dir_for(self, option: Path | None) -> Path:
        """The datasets: `--data-dir` when given, else GKT_DATA_DIR, else ../shared/data."""
        from gkt.evaluation.datasets import resolve_data_dir

        return resolve_data_dir(option or self.data_dir)

    @property
    def api_key_value(self) -> str | None:
        key = self.api_key.get_secret_value().strip() if self.api_key is not None else ""
        return key or None


class StackSettings(CommonSettings):
    """The services' settings a local stack needs before starting them: its key prefix, and which metrics
    ports are set (None: the port is left to the stack, which may pick a free one)."""

    gateway_metrics_port: int | None = Field(default=None, ge=0, le=65535, description="Gateway /metrics.")
    teacher_metrics_port: int | None = Field(default=None, ge=0, le=65535, description="Teacher /metrics.")
    student_metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="The first student's /metrics (others count up)."
    )


class ChaosSettings(BaseSettings):
    """The settings `gkt chaos` gives the stacks it starts, unless the environment sets them (`GKT_*`), and
    the models they run, for its report."""

    model_config = SettingsConfigDict(env_prefix="GKT_", extra="ignore", frozen=True, env_ignore_empty=True)

    key_prefix: str = Field(default="chaos", pattern=r"^[\w.-]+$", description="The stacks' key prefix.")
    gateway_key_max_queued: int = Field(
        default=0,
        ge=0,
        description="Jobs one caller may have queued (0: no limit, so a burst is one tenant).",
    )
    gateway_grace_s: float = Field(
        default=20.0,
        ge=0,
        description="The gateway's drain on SIGTERM: long enough for most streams in flight to finish "
        "(Kubernetes gives it 40 s).",
    )
    gateway_metrics_port: int = Field(default=0, ge=0, le=65535, description="Gateway /metrics (0: off).")
    teacher_metrics_port: int = Field(default=0, ge=0, le=65535, description="Teacher /metrics (0: off).")
    student_metrics_port: int = Field(default=0, ge=0, le=65535, description="Student /metrics (0: off).")
    teacher_model: str = Field(default="", description="The teachers' model (empty: the bundled one).")
    student_model: str = Field(default="", description="The students' model (empty: the bundled one).")

    def stack_env(self) -> dict[str, str]:
        """The stacks' settings, as the environment variables their services read."""
        return {
            "GKT_KEY_PREFIX": self.key_prefix,
            "GKT_GATEWAY_KEY_MAX_QUEUED": str(self.gateway_key_max_queued),
            "GKT_GATEWAY_GRACE_S": f"{self.gateway_grace_s:g}",
            "GKT_GATEWAY_METRICS_PORT": str(self.gateway_metrics_port),
            "GKT_TEACHER_METRICS_PORT": str(self.teacher_metrics_port),
            "GKT_STUDENT_METRICS_PORT": str(self.student_metrics_port),
        }
