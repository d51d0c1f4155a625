"""Settings: environment variables, constraints, and masking at start-up."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from services.gateway.settings import GatewaySettings
from services.teacher.settings import TeacherSettings


def test_settings_come_from_gkt_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GKT_TEACHER_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("GKT_TEACHER_MAX_WAIT_MS", "5")
    settings = TeacherSettings()
    assert (settings.teacher_max_batch_size, settings.teacher_max_wait_ms) == (16, 5)


def test_out_of_range_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GKT_TEACHER_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValidationError, match="teacher_max_batch_size"):
        TeacherSettings()


def test_describe_masks_the_redis_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GKT_REDIS_URL", "redis://user:s3cret@redis.internal:6379/0")
    shown = json.loads(GatewaySettings().describe())
    assert "s3cret" not in json.dumps(shown)
    assert shown["redis_url"] == "redis://user:****@redis.internal:6379/0"
