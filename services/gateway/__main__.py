"""`python -m services.gateway`: serve the gRPC API until SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from gkt import tracing
from gkt.logs import configure_logging
from gkt.metrics import serve_metrics
from services.gateway.server import Gateway
from services.gateway.settings import GatewaySettings

log = logging.getLogger("gkt.gateway")


async def serve(settings: GatewaySettings) -> None:
    gateway = Gateway(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    serve_metrics(port=settings.gateway_metrics_port, addr=settings.metrics_addr)
    await gateway.start()
    await stopping.wait()
    await gateway.stop()


def main() -> None:
    settings = GatewaySettings()
    configure_logging(level=settings.log_level, service="gateway")
    tracing.configure(tracing.TracingSettings(), service="gateway")
    log.info("settings %s", settings.describe())
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
