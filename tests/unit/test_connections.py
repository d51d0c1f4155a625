"""The Redis URL forms every client is built from: a Sentinel URL read into its parts, refused when it is
malformed, and handed to Celery in kombu's own form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from gkt.connections import SentinelTarget, celery_broker, connect, sentinel_target
from gkt.dispatch import student_client
from services.gateway.settings import GatewaySettings
from services.student.broker import transport_for

URL = "redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380,sentinel-3/mymaster/2"


def test_a_sentinel_url_names_its_sentinels_master_database_and_password() -> None:
    assert sentinel_target(URL) == SentinelTarget(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-3", 26379)),
        master="mymaster",
        db=2,
        password="s3cret",
    )
    assert sentinel_target("redis+sentinel://[::1]:26379/m") == SentinelTarget(
        sentinels=(("::1", 26379),), master="m"
    )
    assert sentinel_target("redis://127.0.0.1:6379/0") is None


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://h1:26379/", "path"),
        ("redis+sentinel:///mymaster/0", "at least one sentinel"),
        ("redis+sentinel://h1:port/mymaster", "expected host:port"),
        ("redis+sentinel://h1/mymaster/zero", "expected a number"),
        ("redis+sentinel://h1/mymaster/0/extra", "path"),
        ("redis+sentinel://h1/mymaster/0?ssl_ca_certs=/ca.pem", "TLS is not supported"),
    ],
)
def test_a_malformed_sentinel_url_is_refused_at_start_up_saying_why(url: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        GatewaySettings(redis_url=url)


def test_a_password_file_and_masking_apply_to_a_sentinel_url(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("p@ss:word\n")
    settings = GatewaySettings(redis_url="redis+sentinel://h1,h2/mymaster", redis_password_file=secret)
    target = sentinel_target(settings.redis_url)
    assert target is not None and target.password == "p@ss:word"
    assert json.loads(settings.describe())["redis_url"] == "redis+sentinel://:****@h1,h2/mymaster"


def test_celery_gets_a_sentinel_url_in_kombus_form_with_the_master_name() -> None:
    broker = celery_broker(URL, key_prefix="gkt")
    assert broker["broker_url"] == (
        "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://:s3cret@10.0.0.2:26380/2;"
        "sentinel://:s3cret@sentinel-3:26379/2"
    )
    assert broker["broker_transport_options"] == {"global_keyprefix": "gkt:", "master_name": "mymaster"}
    app = student_client(broker_url=URL, key_prefix="gkt")
    with app.connection_for_write() as connection:  # the kombu connection Celery would open
        assert connection.transport_cls == "sentinel"
        assert len(connection.alt) == 3 and connection.password == "s3cret"


def test_students_consume_through_the_transport_that_outlives_a_lost_connection() -> None:
    assert transport_for(URL) == "services.student.broker:SentinelTransport"
    assert transport_for("redis://127.0.0.1:6379/0") == "services.student.broker:Transport"


def test_a_sentinel_client_asks_the_sentinels_for_the_master_not_the_sentinel_hosts() -> None:
    client = connect(URL)
    pool = client.connection_pool
    assert pool.service_name == "mymaster"  # type: ignore[attr-defined]
    assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "s3cret"
