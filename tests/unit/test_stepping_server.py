"""The benchmark's stand-in for a continuously batching server: fixed-time steps, at most M rows each."""

from __future__ import annotations

import asyncio

from gkt_tools.bench.stepping_server import SteppingEngine


async def test_a_request_lasts_its_length_in_steps_and_a_step_carries_at_most_its_rows() -> None:
    engine = SteppingEngine(step_s=0.001, rows=2, median_tokens=20, sigma=0.6)
    prompts = [f"prompt {i}" for i in range(5)]
    lengths = [min(8, engine.natural_length(p, max_tokens=8)) for p in prompts]
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
    same = engine.natural_length("same prompt", max_tokens=40)
    assert same == engine.natural_length("same prompt", max_tokens=40)
    lengths = {engine.natural_length(f"q{i}", max_tokens=40) for i in range(200)}
    assert min(lengths) < 20 < max(lengths)  # a spread around the median


def test_measured_lengths_are_drawn_for_their_limit_and_the_spread_serves_the_others() -> None:
    measured = {30: [18, 25, 30], 40: [40]}
    engine = SteppingEngine(step_s=0.001, rows=1, median_tokens=5, sigma=0.6, lengths=measured)
    drawn = [engine.natural_length(f"q{i}", max_tokens=30) for i in range(100)]
    assert set(drawn) == {18, 25, 30}  # each measured length, and nothing else
    assert drawn == [engine.natural_length(f"q{i}", max_tokens=30) for i in range(100)]  # seeded
    assert {engine.natural_length(f"q{i}", max_tokens=40) for i in range(20)} == {40}
    assert max(engine.natural_length(f"q{i}", max_tokens=20) for i in range(100)) < 30  # median 5
