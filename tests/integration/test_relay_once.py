"""The relay publishes each event once (issue 15): across a crash between publishing a batch and
saving its checkpoint, and across replicas sharing one store, of which only the leader publishes."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from shared.events import ENROLLMENT, CloudEvent
from shared.relay import Relay
from shared.settings import Settings
from shared.store import EventStore
from tests.conftest import Broker
from tests.integration.test_relay import withdrawn
from tests.support import eventually, read_to_end


def counted(records: list, source: str) -> Counter[str]:
    """How many times each event id of `source` is on the topic."""
    events = [CloudEvent.from_bytes(r.value) for r in records]
    return Counter(e.id for e in events if e.source == source)


async def test_a_batch_the_broker_kept_before_a_crash_is_not_published_again(
        settings: Settings, store: EventStore, broker: Broker) -> None:
    first = Relay(store, settings)
    await store.append("patient-0", [withdrawn("P0", 0)], None)
    assert await first.publish_pending() == 1
    await first.checkpoint_saved()
    for n in range(1, 11):
        await store.append(f"patient-{n}", [withdrawn(f"P{n}", n)], None)

    # The process dies after the broker acknowledged the batch, before the checkpoint commits
    # (it is saved beside the next batches, D88).
    real_transaction = store.transaction

    def crash() -> None:
        raise RuntimeError("killed before the checkpoint")

    store.transaction = crash  # type: ignore[assignment,method-assign]
    try:
        assert await first.publish_pending() == 10
        with pytest.raises(RuntimeError, match="killed before the checkpoint"):
            await first.checkpoint_saved()
    finally:
        store.transaction = real_transaction  # type: ignore[method-assign]
        await first.producer.drop()
        await first.leadership.release()
    # The batch was on the broker: the answers waiting for it were let go before the checkpoint
    # (which never committed), not after it.
    assert first.published_position == await store.head() == 11

    restarted = Relay(store, settings)  # the process, started again
    try:
        assert await restarted.publish_pending() == 10  # the checkpoint moves past all ten...
        await restarted.checkpoint_saved()
        assert await store.checkpoint(restarted.checkpoint_name) == 11
        await store.append("patient-11", [withdrawn("P11", 11)], None)
        assert await restarted.publish_pending() == 1
    finally:
        await restarted.producer.drop()
        await restarted.leadership.release()
    source = f"/services/{settings.service_name}"
    counts = counted(await read_to_end(broker.bootstrap, ENROLLMENT), source)
    assert len(counts) == 12, "an event is missing"
    assert set(counts.values()) == {1}, f"published twice: {[i for i, c in counts.items() if c > 1]}"


async def test_only_the_leader_publishes_and_another_replica_takes_over(
        settings: Settings, database_url: str, store: EventStore, broker: Broker) -> None:
    """Two replicas of a service: each its own store object (as each process has), one
    database. One relay publishes; when it stops, the other takes over where it left off."""
    other_store = EventStore(database_url)
    relays = [Relay(store, settings), Relay(other_store, settings)]
    stops = [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(r.run(s)) for r, s in zip(relays, stops, strict=True)]
    try:
        for n in range(30):
            await (store if n % 2 else other_store).append(
                f"patient-{n}", [withdrawn(f"P{n}", n)], None)
        await eventually(lambda: any(r.published_position >= 30 for r in relays),
                         what="the leader to publish")
        leaders = [r for r in relays if r.leading]
        assert len(leaders) == 1, "both replicas publish" if leaders else "no replica publishes"
        leader = relays.index(leaders[0])
        assert relays[1 - leader].published_position == 0
        stops[leader].set()  # the leader's replica stops (its lock goes with it)
        await tasks[leader]
        for n in range(30, 60):
            await store.append(f"patient-{n}", [withdrawn(f"P{n}", n)], None)
        follower = relays[1 - leader]
        await eventually(lambda: follower.published_position >= 60,
                         what="the other replica to take over")
        assert follower.leading
    finally:
        for s in stops:
            s.set()
        await asyncio.gather(*tasks)
        await other_store.close()
    source = f"/services/{settings.service_name}"
    counts = counted(await read_to_end(broker.bootstrap, ENROLLMENT), source)
    assert len(counts) == 60, "an event is missing"
    assert set(counts.values()) == {1}, "an event was published twice"
