"""Fixtures the integration tests share (the real database and broker come from tests/conftest.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping

import pytest

from services.safety.projection import SAFETY_TYPES
from shared.consumer import ConsumerRunner, Delivery, FailClosed, Handler
from shared.events import dlq_topic
from shared.kafka import ensure_topics
from shared.settings import Settings
from shared.store import EventStore, Transaction
from tests.integration.test_consumer import produce
from tests.integration.test_safety_support import SafetyService, running_safety
from tests.support import eventually


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


async def broken(tx: Transaction, delivery: Delivery) -> None:
    """A handler with a bug: every try fails."""
    raise RuntimeError("a bug in applying the hold")


async def dead_letter_through(store: EventStore, settings: Settings,
                              handlers: Mapping[str, Handler], fail_closed: FailClosed,
                              *records: bytes) -> None:
    """Publish `records` to a safety topic of the test's own, and consume them with `handlers`
    until each is dead-lettered, failing closed with `fail_closed`."""
    topic = f"test.safety.{uuid.uuid4().hex[:8]}"  # the session broker's trial.safety is shared
    await ensure_topics(settings, [topic, dlq_topic(topic)])
    await produce(settings, topic, *records)
    runner = ConsumerRunner(store, settings, [topic], handlers,
                            group_id=f"g-{uuid.uuid4().hex[:8]}",
                            fail_closed={topic: fail_closed})
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await eventually(lambda: runner.dead_lettered >= len(records), timeout=120,
                         what=f"{len(records)} records dead-lettered")
    finally:
        stop.set()
        await task
