from __future__ import annotations

import os

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every ``@pytest.mark.anyio`` test runs on asyncio and on trio."""
    return str(request.param)


def require_servers() -> bool:
    """True when CI asks that a missing server fail its tests instead of skipping them."""
    return os.environ.get("RESILIENT_REQUIRE_SERVERS", "") not in ("", "0")
