"""bench.replay's floors of the ledger's rebuild do the ledger's own work: the entries the audit
service's `record` files, in the same streams, in a hash chain the store verifies; in one
process, and with forked parsers handing batches to one chain (D94)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bench import replay
from bench.replay import ledger_floor_file, ledger_pipeline_file
from bench.scale import cloud_events
from services.audit.commands import record
from shared.consumer import Delivery
from shared.migrate import upgrade
from shared.store import EventStore, RecordedEvent


def _filed(events: list[RecordedEvent]) -> list[tuple[object, ...]]:
    return [(e.stream_id, e.stream_version, e.type, e.event_id, e.schema_version, e.data,
             e.metadata) for e in events]


FLOORS: dict[str, Callable[[list[tuple[str, bytes]], str], int]] = {
    "one process": ledger_floor_file,
    "two parsers and one chain": lambda records, path: ledger_pipeline_file(records, path, 2),
}


@pytest.mark.parametrize("floor_of", FLOORS.values(), ids=FLOORS.keys())
async def test_the_floor_files_what_the_ledger_files_in_a_chain_that_verifies(
        tmp_path: Path, floor_of: Callable[[list[tuple[str, bytes]], str], int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay, "FLOOR_BATCH", 7)  # several batches, several transactions
    published = list(cloud_events(3))
    records = [(topic, event.to_bytes()) for topic, event in published]
    floor_url, ledger_url = (f"sqlite+aiosqlite:///{tmp_path / name}.db"
                             for name in ("floor", "ledger"))
    await upgrade(floor_url)
    await upgrade(ledger_url)
    assert floor_of(records, floor_url.removeprefix("sqlite+aiosqlite:///")) == len(records)

    ledger = EventStore(ledger_url)
    floor = EventStore(floor_url)
    try:
        for topic, event in published:  # one a transaction: the floor's batches make no odds
            async with ledger.transaction() as tx:
                await record(tx, Delivery(event, event.typed_data(), topic))
        filed, floored = (await ledger.read_all(limit=None), await floor.read_all(limit=None))
        assert len(floored) == len(records) > 0
        assert _filed(floored) == _filed(filed)
        verified = await floor.verify()
        assert verified.ok and verified.events_checked == len(records)
    finally:
        await ledger.close()
        await floor.close()
