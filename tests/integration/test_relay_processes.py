"""The group commit across processes: 32 writers in 4 processes append to one store while a relay
publishes; every position reaches the broker exactly once, in order, none skipped (D1, D39)."""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from shared.events import ENROLLMENT, CloudEvent
from shared.relay import Relay
from shared.settings import Settings
from shared.store import EventStore
from tests.conftest import Broker
from tests.integration.test_relay import assert_complete_and_ordered, ours, withdrawn
from tests.support import eventually, read_topic

PROCESSES, WRITERS, APPENDS = 4, 8, 12  # 32 writers, 384 transactions, 480 events


async def _write(url: str, process: int) -> int:
    """One process: its writers share one store, so they meet in its group commit; the
    processes meet at the database's lock."""
    store = EventStore(url)

    async def writer(w: int) -> int:
        version = 0  # every append checks its stream's version
        for n in range(APPENDS):
            batch = [withdrawn(f"P{process}-{w}", n) for _ in range(2 if n % 4 == 0 else 1)]
            await store.append(f"patient-{process}-{w}", batch, version)
            version += len(batch)
        return version

    try:
        return sum(await asyncio.gather(*(writer(w) for w in range(WRITERS))))
    finally:
        await store.close()


def write_in_a_process(url: str, process: int) -> int:
    return asyncio.run(_write(url, process))


async def test_32_writers_in_4_processes_every_position_published_once_in_order(
        settings: Settings, store: EventStore, broker: Broker) -> None:
    relay = Relay(store, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    loop = asyncio.get_running_loop()
    try:
        with ProcessPoolExecutor(PROCESSES, mp_context=get_context("spawn")) as pool:
            written = await asyncio.gather(*(
                loop.run_in_executor(pool, write_in_a_process, settings.database_url, p)
                for p in range(PROCESSES)))
        total = sum(written)
        assert total == PROCESSES * WRITERS * (APPENDS + len(range(0, APPENDS, 4)))
        await eventually(lambda: relay.published_position >= total, what="relay to catch up")
    finally:
        stop.set()
        await task
    assert await store.head() == total and (await store.verify()).events_checked == total
    source = f"/services/{settings.service_name}"
    records = await read_topic(broker.bootstrap, ENROLLMENT,
                               until=lambda rs: len(ours(rs, source)) >= total)
    assert_complete_and_ordered(records, source, total)
    published = Counter(e.sequence for e in ours(records, source))
    assert set(published.values()) == {1}, "a position was published more than once"
    events = [CloudEvent.from_bytes(r.value) for r in records]
    assert len({e.id for e in events if e.source == source}) == total
