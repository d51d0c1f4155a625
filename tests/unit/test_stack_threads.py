"""A local stack shares the machine's cores among its model processes unless told otherwise."""

from __future__ import annotations

import os
from pathlib import Path

from gkt_tools.stack import Stack


def test_each_model_process_gets_its_share_of_the_cores(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert Stack(state_dir=tmp_path, students=1).torch_threads_each() == max(1, cores // 2)
    assert Stack(state_dir=tmp_path, students=3, teachers=2).torch_threads_each() == max(1, cores // 5)
    assert Stack(state_dir=tmp_path, students=2, teacher=False).torch_threads_each() == max(1, cores // 2)
    assert Stack(state_dir=tmp_path, students=64).torch_threads_each() == 1


def test_the_share_is_the_default_and_a_setting_wins(tmp_path: Path) -> None:
    shared = Stack(state_dir=tmp_path, students=1)
    assert shared._service_env()["GKT_TORCH_THREADS"] == str(shared.torch_threads_each())
    explicit = Stack(state_dir=tmp_path, students=1, env={"GKT_TORCH_THREADS": "0"})
    assert explicit._service_env()["GKT_TORCH_THREADS"] == "0"
