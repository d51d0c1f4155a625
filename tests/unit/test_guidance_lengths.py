"""The ceiling of what keeping every server row busy gains over one batch at a time, at given lengths."""

from __future__ import annotations

import pytest

from gkt_tools.bench.guidance_lengths import batch_ceiling, by_limit


def _measured(tables: dict[int, list[int]]) -> dict[str, object]:
    return {
        "tasks": {
            f"task{limit}": {"max_guidance_tokens": limit, "lengths": lengths}
            for limit, lengths in tables.items()
        }
    }


def test_the_server_table_is_keyed_by_each_tasks_guidance_limit() -> None:
    assert by_limit(_measured({20: [7, 20], 40: [40]})) == {"20": [7, 20], "40": [40]}


def test_equal_lengths_leave_nothing_to_gain() -> None:
    assert batch_ceiling(_measured({20: [20], 30: [30]}), rows=1, limits=(20, 30)) == 1.0


def test_a_batch_lasts_as_long_as_its_longest_row() -> None:
    # Half the rows need 10 steps, half 30: a batch of 16 almost surely holds a 30, mean length 20.
    ceiling = batch_ceiling(_measured({30: [10, 30]}), rows=16, limits=(30,))
    assert ceiling == pytest.approx(1.5, rel=0.01)
    # Limits asked in turn: every batch of 2 holds one 10 and one 30.
    assert batch_ceiling(_measured({10: [10], 30: [30]}), rows=2, limits=(10, 30)) == pytest.approx(1.5)
