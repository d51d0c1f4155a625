"""`gkt up` and `gkt down`: the whole stack in the background, found again through its state directory."""

from __future__ import annotations

import sys

from gkt_tools.settings import ToolSettings
from gkt_tools.stack import Stack, StackError, read_detached, stop_detached


def up(settings: ToolSettings) -> int:
    """Start the stack in the background, its state in `settings.state_dir`; 1 when one runs already."""
    state_dir = settings.state_dir
    running = read_detached(state_dir)
    if running:
        print(
            f"error: a stack is already up here (gateway {running['gateway']}); `make down` first",
            file=sys.stderr,
        )
        return 1
    stack = Stack(
        state_dir=state_dir,
        redis_url=settings.redis_url,
        gateway_addr=settings.gateway_addr or None,
        detach=True,
        pick_free_ports=True,
    )
    try:
        stack.start(progress=True)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ports = ", ".join(f"{name} {port}" for name, port in stack.metrics_ports.items())
    print(f"stack up: gateway {stack.gateway_addr}, Redis {stack.redis_url}; logs in {state_dir / 'logs'}/")
    print(f"metrics ports: {ports or 'none'}")
    # Another state directory than the default must be named again to find this stack.
    state = f"GKT_STATE_DIR={state_dir} " if "state_dir" in settings.model_fields_set else ""
    print(f'try:  .venv/bin/gkt ask --addr {stack.gateway_addr} "What is 12 * 7?" --stream')
    print(f"      {state}.venv/bin/gkt status")
    print(f"stop: {state}make down")
    return 0


def down(settings: ToolSettings) -> int:
    """Stop the stack `up` started here."""
    stopped = stop_detached(settings.state_dir)
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing running")
    return 0
