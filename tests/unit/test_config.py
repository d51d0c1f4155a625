"""Settings: environment variables, constraints, and masking at start-up."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import BaseSettings
from redis.connection import parse_url

from gkt.config import variable_name
from gkt.connections import broker_tls_options
from gkt.dispatch import student_client
from gkt_tools.processes import child_environment
from services.gateway.settings import GatewaySettings
from services.student.settings import StudentServerSettings, StudentSettings
from services.teacher.settings import TeacherServerSettings, TeacherSettings


def test_settings_come_from_gkt_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GKT_TEACHER_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("GKT_TEACHER_MAX_WAIT_MS", "5")
    settings = TeacherSettings()
    assert (settings.teacher_max_batch_size, settings.teacher_max_wait_ms) == (16, 5)


def test_out_of_range_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GKT_TEACHER_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValidationError, match="teacher_max_batch_size"):
        TeacherSettings()


@pytest.mark.parametrize(
    "classes", [(TeacherSettings, TeacherServerSettings), (StudentSettings, StudentServerSettings)]
)
def test_each_variable_fills_one_setting_of_its_service(classes: tuple[type[BaseSettings], ...]) -> None:
    variables = [variable_name(cls, name) for cls in classes for name in cls.model_fields]
    assert sorted(v for v in set(variables) if variables.count(v) > 1) == []


def test_the_model_variables_fill_only_the_workers_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GKT_TEACHER_MODEL", "teacher-70b")
    monkeypatch.setenv("GKT_STUDENT_MODEL", "student-7b")
    assert (TeacherSettings().teacher_model, StudentSettings().student_model) == ("teacher-70b", "student-7b")
    assert "teacher-70b" not in TeacherServerSettings().model_dump_json()
    assert "student-7b" not in StudentServerSettings().model_dump_json()


def test_describe_masks_the_redis_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GKT_REDIS_URL", "redis://user:s3cret@redis.internal:6379/0")
    shown = json.loads(GatewaySettings().describe())
    assert "s3cret" not in json.dumps(shown)
    assert shown["redis_url"] == "redis://user:****@redis.internal:6379/0"


def test_a_password_file_puts_its_password_into_the_redis_url(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("p@ss/word:1\n")  # as a Kubernetes Secret mounts it: trailing newline, odd characters
    settings = GatewaySettings(redis_url="rediss://cache.internal:6380/2", redis_password_file=secret)
    parsed = parse_url(settings.redis_url)
    assert parsed["password"] == "p@ss/word:1"
    assert (parsed["host"], parsed["port"], parsed["db"]) == ("cache.internal", 6380, 2)
    assert json.loads(settings.describe())["redis_url"] == "rediss://:****@cache.internal:6380/2"


def test_a_redis_url_must_be_redis_rediss_or_unix() -> None:
    with pytest.raises(ValidationError, match="scheme 'http'"):
        GatewaySettings(redis_url="http://127.0.0.1:6379/0")


def test_a_rediss_url_gives_celery_verified_tls_options() -> None:
    url = "rediss://:pw@redis.internal:6380/0?ssl_ca_certs=/etc/gkt/redis-ca.pem"
    assert broker_tls_options(url) == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/etc/gkt/redis-ca.pem",
    }
    assert broker_tls_options("rediss://redis.internal/0?ssl_cert_reqs=CERT_NONE") == {
        "ssl_cert_reqs": ssl.CERT_NONE
    }
    assert broker_tls_options("redis://redis.internal/0") is None
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        broker_tls_options("rediss://redis.internal/0?ssl_cert_reqs=maybe")


def test_the_celery_apps_carry_the_tls_options_of_a_rediss_url() -> None:
    url = "rediss://:pw@redis.internal:6380/0?ssl_ca_certs=/ca.pem"
    app = student_client(broker_url=url, key_prefix="gkt")
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem"}
    with app.connection_for_write() as connection:  # the kombu connection Celery would open
        assert connection.ssl == app.conf.broker_use_ssl
        assert connection.password == "pw" and connection.port == 6380


def test_the_student_worker_app_uses_tls_for_a_rediss_url() -> None:
    code = (
        "from services.student.celery_app import app; import ssl; "
        "assert app.conf.broker_use_ssl['ssl_cert_reqs'] == ssl.CERT_REQUIRED, app.conf.broker_use_ssl; "
        "assert app.conf.broker_use_ssl['ssl_ca_certs'] == '/ca.pem'"
    )
    env = child_environment({"GKT_REDIS_URL": "rediss://:pw@redis.internal:6380/0?ssl_ca_certs=/ca.pem"})
    # A fresh interpreter: the worker app reads its settings once, at import.
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=120)
