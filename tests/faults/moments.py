"""When to kill a process so that the kill lands where a crash does harm, not between two writes.

A kill at a random instant mostly finds a service idle: the relay's window between a batch on the
broker and its checkpoint saved lasts milliseconds, and a fault test that never lands in it proves
nothing about it. So each kill waits (a condition, with a deadline) for its moment:

- a service with a relay: one of its own records has reached the broker while the store's relay
  checkpoint does not cover it yet (the record's CloudEvent `sequence` is its store position):
  the batch is published and not checkpointed, the very state a crash must not turn into a
  second copy on Kafka;
- the audit ledger: a record has just arrived on a topic it files (its consumer is at work);
- the gateway: requests are in flight through it.

If the moment does not come before the deadline, the kill happens anyway and says so. The kill
(`act`) is done the instant the moment is seen, before anything else (closing the tail takes
longer than the relay's window).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer

from shared.events import LEDGER_TOPICS
from shared.kafka import client_options, known_partitions
from shared.store import EventStore
from tests.faults.accounting import RELAY, kafka_settings
from tests.faults.driver import LoadDriver
from tests.support import eventually


@dataclass(frozen=True)
class Moment:
    """Where the kill landed: `hit` when in the state sought, and what was seen."""

    hit: bool
    what: str


class BrokerTail:
    """A group-less consumer at the end of every ledger topic, started before the moment is
    sought, so it sees each record as it lands."""

    def __init__(self, bootstrap: str) -> None:
        self.consumer = AIOKafkaConsumer(**client_options(kafka_settings(bootstrap)),
                                         enable_auto_commit=False, fetch_max_wait_ms=5,
                                         metadata_max_age_ms=1000)

    async def __aenter__(self) -> BrokerTail:
        await self.consumer.start()
        partitions = [tp for topic in LEDGER_TOPICS
                      for tp in await known_partitions(self.consumer, topic)]
        self.consumer.assign(partitions)
        await self.consumer.seek_to_end(*partitions)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def mid_batch(self, service: str, store: EventStore, cluster: str | None,
                        timeout: float, act: Callable[[], None]) -> Moment:
        """`act` once a record of `service` is on the broker that its relay has not
        checkpointed (or at the deadline)."""
        source = f"/services/{service}"
        name = f"{RELAY}@{cluster}" if cluster else RELAY
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            batch = await self.consumer.getmany(timeout_ms=50)
            for records in batch.values():
                for record in records:
                    envelope = json.loads(record.value or b"{}")
                    if envelope.get("source") != source:
                        continue
                    seen += 1
                    checkpoint = await store.checkpoint(name)
                    if checkpoint < int(envelope.get("sequence", 0)):
                        act()
                        return Moment(True, f"position {envelope['sequence']} on the broker, "
                                            f"checkpoint at {checkpoint}")
        act()
        return Moment(False, f"no unsaved batch seen in {timeout:g} s ({seen} records)")

    async def filing(self, timeout: float, act: Callable[[], None]) -> Moment:
        """`act` once a record lands on a ledger topic (the ledger's consumer then files it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await self.consumer.getmany(timeout_ms=50)
            if batch:
                act()
                record = next(iter(batch.values()))[0]
                return Moment(True, f"a record just landed on {record.topic}")
        act()
        return Moment(False, f"no record in {timeout:g} s")


async def requests_in_flight(driver: LoadDriver, timeout: float,
                             act: Callable[[], None]) -> Moment:
    """`act` once the driver has a request out."""
    try:
        await eventually(lambda: driver.in_flight > 0, timeout, "a request in flight")
    except AssertionError:
        act()
        return Moment(False, f"no request in flight in {timeout:g} s")
    act()
    return Moment(True, "requests in flight")
