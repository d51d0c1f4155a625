"""Clients that outlive a Redis restart: a real redis-server stopped and started again on the same port
under clients whose pooled connections it dropped."""

from __future__ import annotations

from pathlib import Path

from gkt.connections import connect_async
from gkt_tools.processes import free_port
from tests.conftest import redis_server


async def test_the_teachers_pipeline_on_a_connection_redis_dropped_is_sent_again_on_a_fresh_one(
    tmp_path: Path,
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with redis_server(tmp_path, url, "--port", str(port)):
        client = connect_async(url)
        async with client.pipeline(transaction=False) as pipe:
            pipe.set("before", "1")
            await pipe.execute()  # the pooled connection Redis is about to drop
    with redis_server(tmp_path, url, "--port", str(port)):
        async with client.pipeline(transaction=False) as pipe:
            pipe.set("after", "2")
            pipe.get("after")
            assert await pipe.execute() == [True, b"2"]
        await client.aclose()
