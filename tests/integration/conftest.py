"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.fake_inference_server import ServerFactory, published_api_servers


@pytest.fixture
def servers() -> Iterator[ServerFactory]:
    """Start servers that follow the published inference APIs; each stops when the test ends."""
    with published_api_servers() as start:
        yield start
