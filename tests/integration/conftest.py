"""Fixtures the integration tests share (the real database and broker come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.safety.projection import SAFETY_TYPES
from shared.settings import Settings
from tests.integration.test_safety_support import SafetyService, running_safety


@pytest.fixture
async def safety(settings: Settings) -> AsyncIterator[SafetyService]:
    # No relay and no consumers: these holds must not reach other tests' services on the
    # shared broker, and the patients are handed to the consumer's handler directly.
    quiet = settings.model_copy(update={"relay_enabled": False, "consumers_enabled": False,
                                        "service_name": "safety"})
    async with running_safety(quiet) as service:
        yield service


async def safety_events(service: SafetyService) -> list[str]:
    return [e.event_id for e in await service.runtime.store.read_all(limit=100_000)
            if e.type in SAFETY_TYPES]
