"""The benchmark's stand-in for a continuously batching server: fixed-time steps, at most M rows each."""

from __future__ import annotations

import asyncio

from gkt_tools.bench.stepping_server import SteppingEngine


async def test_a_request_lasts_its_length_in_steps_and_a_step_carries_at_most_its_rows() -> None:
    engine = SteppingEngine(step_s=0.001, rows=2, median_tokens=20, sigma=0.6)
    prompts = [f"prompt {i}" for i in range(5)]
    lengths = [min(8, engine.natural_length(p)) for p in prompts]
    stepping = asyncio.create_task(engine.run())
    try:
        rows = await asyncio.gather(*(engine.generate(prompt=p, max_tokens=8) for p in prompts))
    finally:
        stepping.cancel()
    assert [row.length for row in rows] == lengths
    assert all(row.tokens == row.length for row in rows)
    # every token was one row of one step, and no step carried more than 2 rows
    assert engine.row_steps == sum(lengths)
    assert engine.steps >= sum(lengths) / 2
    assert engine.requests == 5 and engine.waiting_steps > 0  # 5 requests for 2 rows: some waited


def test_a_prompts_natural_length_is_the_same_every_time() -> None:
    engine = SteppingEngine(step_s=0.001, rows=1, median_tokens=20, sigma=0.6)
    assert engine.natural_length("same prompt") == engine.natural_length("same prompt")
    lengths = {engine.natural_length(f"q{i}") for i in range(200)}
    assert min(lengths) < 20 < max(lengths)  # a spread around the median
