"""The Redis that `gkt up` / `make up` and the test stacks start keeps its data across a restart (AOF)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from redis import Redis

from gkt_tools.stack import Stack


def test_the_stacks_redis_appends_every_write_and_keeps_it_across_a_kill(tmp_path: Path) -> None:
    stack = Stack(state_dir=tmp_path)
    (tmp_path / "logs").mkdir()
    url = stack._start_redis()
    try:
        redis = Redis.from_url(url)
        assert redis.config_get("appendonly") == {"appendonly": "yes"}
        assert redis.config_get("appendfsync") == {"appendfsync": "everysec"}
        redis.xadd("gkt:queries", {"job": "a queued job"})
        redis.close()

        stack.kill("redis", signal.SIGKILL)  # no shutdown save: only the append-only file can keep it
        stack.restart("redis")
        redis = Redis.from_url(url)
        deadline = time.monotonic() + 10
        while not _answers(redis):
            assert time.monotonic() < deadline, "redis did not come back"
            time.sleep(0.05)
        assert redis.xlen("gkt:queries") == 1
        redis.close()
    finally:
        stack.stop()


def _answers(redis: Redis) -> bool:
    try:
        return bool(redis.ping())
    except Exception:
        return False
