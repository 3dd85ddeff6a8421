"""The event store against the real database: concurrency, gapless commit order, immutability."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError

from shared.store import ConcurrencyError, EventFilter, EventStore, NewEvent
from tests.support import tamper

WRITERS = 10


def ev(n: int = 0) -> NewEvent:
    return NewEvent("TestHappened", {"n": n, "weight_kg": 70.5, "note": "é ü"},
                    {"actor": "tester", "role": "admin"})


async def test_append_read_and_expected_version(store: EventStore) -> None:
    first = await store.append("s-1", [ev(1), ev(2)], expected_version=0)
    assert [e.stream_version for e in first] == [1, 2]
    assert [e.position for e in first] == [1, 2]
    with pytest.raises(ConcurrencyError) as err:
        await store.append("s-1", [ev(3)], expected_version=1)
    assert err.value.actual == 2
    await store.append("s-1", [ev(3)], expected_version=2)
    read = await store.read_stream("s-1")
    assert [e.data["n"] for e in read] == [1, 2, 3]
    assert read[0].data == first[0].data and read[0].hash == first[0].hash
    assert read[1].prev_hash == read[0].hash
    assert (await store.verify()).ok


async def test_streams_read_together_are_each_whole_and_in_version_order(
        store: EventStore) -> None:
    # Interleaved in position: each stream must come back alone, whole, in its own order.
    for n in range(3):
        await store.append("a-1", [ev(n)], expected_version=n)
        await store.append("b-1", [ev(10 + n), ev(20 + n)], expected_version=2 * n)
    found = await store.read_streams("b-1", "a-1", "never-written")
    assert list(found) == ["b-1", "a-1", "never-written"]
    assert [e.data["n"] for e in found["a-1"]] == [0, 1, 2]
    assert [e.data["n"] for e in found["b-1"]] == [10, 20, 11, 21, 12, 22]
    assert found["never-written"] == []
    assert [e.hash for e in found["b-1"]] == [e.hash for e in await store.read_stream("b-1")]


async def test_sixteen_concurrent_reads_reuse_their_connections(store: EventStore) -> None:
    # A busy service's readers: once the pool holds a connection for each, no read opens one
    # (the default five kept made every read past the fifth open and close its own, D75).
    await store.append("r-1", [ev(1)], expected_version=0)
    opened = 0

    def on_connect(*_: Any) -> None:
        nonlocal opened
        opened += 1

    sa.event.listen(store.read_engine.sync_engine, "connect", on_connect)
    try:
        async def wave() -> None:
            reads = await asyncio.gather(*(store.read_stream("r-1") for _ in range(16)))
            assert all(len(read) == 1 for read in reads)

        await wave()
        after_first = opened
        for _ in range(5):
            await wave()
        assert 0 < after_first <= 16 and opened == after_first
    finally:
        sa.event.remove(store.read_engine.sync_engine, "connect", on_connect)


async def test_concurrent_appends_at_the_same_version_exactly_one_wins(database_url: str,
                                                                       store: EventStore) -> None:
    await store.append("contested", [ev()], expected_version=0)
    # One store (engine) per writer, so the database's lock does the work, not the process's.
    writers = [EventStore(database_url) for _ in range(WRITERS)]
    try:
        for round_ in range(5):
            version = 1 + round_
            results = await asyncio.gather(
                *(w.append("contested", [ev(i)], expected_version=version)
                  for i, w in enumerate(writers)), return_exceptions=True)
            winners = [r for r in results if isinstance(r, list)]
            losers = [r for r in results if isinstance(r, ConcurrencyError)]
            assert len(winners) == 1, results
            assert len(losers) == WRITERS - 1, results
    finally:
        for w in writers:
            await w.close()
    stream = await store.read_stream("contested")
    assert [e.stream_version for e in stream] == list(range(1, 7))
    assert (await store.verify()).ok


async def test_positions_are_gapless_and_never_skipped_by_a_concurrent_reader(
        database_url: str, store: EventStore) -> None:
    """The relay's hazard: a later position visible before an earlier one commits.

    Many writers append concurrently while a reader does exactly what the relay does
    (read after its checkpoint, advance to the last position seen). If any position ever became
    visible before a smaller one, the reader would jump past the smaller one and miss it.
    """
    writers = [EventStore(database_url) for _ in range(WRITERS)]
    rounds = 15
    done = asyncio.Event()
    seen: list[int] = []

    async def write(w: EventStore, idx: int) -> None:
        for r in range(rounds):
            await w.append(f"w{idx}", [ev(r), ev(r)] if r % 3 == 0 else [ev(r)], None)

    async def relay_like_reader() -> None:
        checkpoint = 0
        while True:
            finished = done.is_set()
            batch = await store.read_all(after=checkpoint, limit=random.randint(1, 50))
            seen.extend(e.position for e in batch)
            if batch:
                checkpoint = batch[-1].position
            elif finished:
                return
            await asyncio.sleep(0)

    reader = asyncio.create_task(relay_like_reader())
    try:
        await asyncio.gather(*(write(w, i) for i, w in enumerate(writers)))
    finally:
        done.set()
        await reader
        for w in writers:
            await w.close()
    total = WRITERS * (rounds + len(range(0, rounds, 3)))
    assert seen == list(range(1, total + 1))
    assert await store.head() == total
    assert (await store.verify()) .events_checked == total


async def test_the_database_refuses_update_and_delete(store: EventStore) -> None:
    await store.append("s", [ev(1), ev(2)], 0)
    statements = ["UPDATE events SET type = 'Forged' WHERE position = 1",
                  "UPDATE events SET data = '{}'",
                  "DELETE FROM events WHERE position = 2",
                  "DELETE FROM events"]
    if not store.sqlite:
        statements.append("TRUNCATE events")
    for statement in statements:
        with pytest.raises((IntegrityError, DBAPIError)) as err:
            async with store.engine.begin() as conn:
                await conn.execute(sa.text(statement))
        assert "append-only" in str(err.value)
    events = await store.read_stream("s")
    assert [e.type for e in events] == ["TestHappened"] * 2
    assert (await store.verify()).ok




@pytest.mark.parametrize("statement", [
    "UPDATE events SET data = '{\"n\": 999, \"weight_kg\": 70.5, \"note\": \"é ü\"}' WHERE position = 7",
    "UPDATE events SET metadata = '{\"actor\": \"someone-else\", \"role\": \"admin\"}' WHERE position = 7",
    "UPDATE events SET type = 'Forged' WHERE position = 7",
])
async def test_verifier_names_the_first_altered_position(store: EventStore, statement: str) -> None:
    for i in range(12):
        await store.append(f"s{i % 3}", [ev(i)], None)
    assert (await store.verify()) .ok
    await tamper(store, statement)
    result = await store.verify()
    assert not result.ok
    assert result.first_broken_position == 7
    assert result.events_checked == 6


async def test_verifier_breaks_on_stored_text_that_decodes_to_the_same_values(
        store: EventStore) -> None:
    """A key given twice decodes, in Python, to the values hashed (the last copy wins), while
    SQLite's json_extract, which the audit's filters use, reads the first: the forged actor
    would move the entry between actors' queries with the chain still verifying. The text
    stored is what is checked, so it and any other non-canonical text break the link."""
    for i in range(9):
        await store.append("s", [ev(i)], None)
    json_of = "" if store.sqlite else "::json"
    await tamper(store, "UPDATE events SET metadata = ('{\"actor\":\"mallory\",' || "
                        f"substr(metadata{'' if store.sqlite else '::text'}, 2)){json_of} "
                        "WHERE position = 4")
    await tamper(store, "UPDATE events SET data = replace("
                        f"data{'' if store.sqlite else '::text'}, ',', ', '){json_of} "
                        "WHERE position = 6")
    async with store.engine.connect() as conn:
        forged = (await conn.execute(sa.text(
            "SELECT metadata FROM events WHERE position = 4"))).scalar_one()
    assert (forged if isinstance(forged, dict) else json.loads(forged))["actor"] == "tester"
    result = await store.verify()
    assert (result.ok, result.first_broken_position, result.events_checked) == (False, 4, 3)


async def test_verifier_names_a_row_that_is_not_json_rather_than_failing(
        store: EventStore) -> None:
    for i in range(5):
        await store.append("s", [ev(i)], None)
    statement = "UPDATE events SET data = substr(data, 1, 7) WHERE position = 2"
    if not store.sqlite:  # PostgreSQL's json type refuses the text itself
        with pytest.raises(DBAPIError, match="invalid input syntax for type json"):
            await tamper(store, "UPDATE events SET data = substr(data::text, 1, 7)::json "
                                "WHERE position = 2")
        assert (await store.verify()).ok
        return
    await tamper(store, statement)
    result = await store.verify()
    assert (result.ok, result.first_broken_position, result.events_checked) == (False, 2, 1)


async def test_verifier_reports_a_removed_row(store: EventStore) -> None:
    for i in range(5):
        await store.append("s", [ev(i)], None)
    async with store.engine.begin() as conn:
        if store.sqlite:
            await conn.execute(sa.text("DROP TRIGGER events_no_delete"))
        else:
            await conn.execute(sa.text("ALTER TABLE events DISABLE TRIGGER events_append_only"))
        await conn.execute(sa.text("DELETE FROM events WHERE position = 3"))
    result = await store.verify()
    assert (result.ok, result.first_broken_position) == (False, 3)


async def test_migrations_are_idempotent_and_processed_ids_are_transactional(
        database_url: str, store: EventStore) -> None:
    from shared.migrate import upgrade

    await upgrade(database_url)  # a second start-up changes nothing
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.append("s", [ev()], 0)
            await tx.mark_processed("c", "e-1", "t")
            raise RuntimeError("handler failed after writing")
    async with store.transaction() as tx:  # both rolled back together
        assert not await tx.was_processed("c", "e-1")
        assert await tx.stream_version("s") == 0


async def test_a_commit_is_refused_when_a_stream_it_read_has_moved(store: EventStore) -> None:
    """The premise of a decision (a holds stream, say) moved between its read and its commit:
    nothing of the transaction is written, and `ConcurrencyError` says to decide again (D39)."""
    await store.append("holds", [ev(1)], None)
    with pytest.raises(ConcurrencyError):
        async with store.transaction() as tx:
            assert len(await tx.read_stream("holds")) == 1
            await store.append("holds", [ev(2)], None)  # another writer commits in between
            await tx.append("doses", [ev(3)], None)
            await tx.mark_processed("c", "e-1", "t")
    assert await store.read_stream("doses") == []
    async with store.transaction() as tx:
        assert not await tx.was_processed("c", "e-1")
    async with store.transaction() as tx:  # read again, the same decision commits
        assert len(await tx.read_stream("holds")) == 2
        await tx.append("doses", [ev(3)], None)
    assert [e.stream_version for e in await store.read_stream("doses")] == [1]


@pytest.mark.parametrize("moved", ["a-1", "b-1", "never-written"])
async def test_streams_read_ahead_in_a_transaction_are_each_checked_at_commit(
        store: EventStore, moved: str) -> None:
    """D81: several streams read in one statement, each after its own version, give what a read
    of each gives, and the commit is refused when any one of them has moved since."""
    for n in range(3):
        await store.append("a-1", [ev(n)], expected_version=n)
        await store.append("b-1", [ev(10 + n)], expected_version=n)
    async with store.transaction() as tx:
        found = await tx.read_streams({"a-1": 0, "b-1": 2, "never-written": 0})
        assert [e.data["n"] for e in found["a-1"]] == [0, 1, 2]
        assert [e.data["n"] for e in found["b-1"]] == [12]
        assert found["never-written"] == []
        assert found["a-1"] == await tx.read_stream("a-1")
    with pytest.raises(ConcurrencyError):
        async with store.transaction() as tx:
            await tx.read_streams({"a-1": 0, "b-1": 2, "never-written": 0})
            await store.append(moved, [ev(99)], None)  # another writer commits in between
            await tx.append("decision", [ev()], None)
    assert await store.read_stream("decision") == []


async def test_a_read_across_streams_is_refused_when_anything_committed_since(
        store: EventStore) -> None:
    with pytest.raises(ConcurrencyError):
        async with store.transaction() as tx:
            assert await tx.read_all() == []
            await store.append("elsewhere", [ev()], None)
            await tx.append("decision", [ev()], None)
    assert [e.stream_id for e in await store.read_all()] == ["elsewhere"]


async def test_concurrent_transactions_share_one_database_commit(store: EventStore) -> None:
    before = store.group_commits
    results = await asyncio.gather(*(store.append(f"g{i}", [ev(i)], 0) for i in range(16)))
    assert sorted(r[0].position for r in results) == list(range(1, 17))
    assert store.group_commits - before < 16  # grouped: fewer commits than transactions
    assert (await store.verify()).events_checked == 16


async def test_a_wrong_transaction_in_a_group_commit_fails_alone(store: EventStore) -> None:
    """A duplicate event id (the database's unique key refuses it) fails its own transaction,
    never the others committed with it; positions stay gapless and the chain verifies."""
    (first,) = await store.append("s", [ev()], None)
    duplicate = NewEvent("TestHappened", {"n": -1}, {}, event_id=first.event_id)
    stale = store.append("s", [ev(-2)], expected_version=0)  # "s" is at version 1
    results = await asyncio.gather(*(store.append(f"g{i}", [ev(i)], 0) for i in range(6)),
                                   store.append("dup", [duplicate], None), stale,
                                   *(store.append(f"h{i}", [ev(i)], 0) for i in range(6)),
                                   return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["list"] * 6 + ["ConcurrencyError"] * 2 + [
        "list"] * 6
    assert await store.read_stream("dup") == []
    assert [e.position for e in await store.read_all()] == list(range(1, 14))
    assert (await store.verify()).events_checked == 13


async def test_a_lost_connection_during_a_group_commit_is_an_error_to_wait_out(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncpg's own errors (its raw executemany and COPY are not wrapped by SQLAlchemy) reach
    the callers as SQLAlchemy's OperationalError, which consumers wait out and retry, never as a
    handler failure that would send a good record to the DLQ; nothing of the batch is written."""
    import shared.store as module

    row = module._row
    lost = [asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")]

    def dies_once(*args: Any) -> tuple[dict[str, Any], tuple[Any, ...]]:
        if lost:
            raise lost.pop()
        return row(*args)

    monkeypatch.setattr(module, "_row", dies_once)
    results = await asyncio.gather(*(store.append(f"c{i}", [ev(i)], 0) for i in range(4)),
                                   return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["OperationalError"] * 4
    assert await store.read_all() == []
    (again,) = await store.append("c0", [ev()], 0)  # the store carries on
    assert again.position == 1 and (await store.verify()).ok


async def test_a_scan_pages_through_the_rows_as_stored_text(store: EventStore) -> None:
    for n in range(7):
        await store.append(f"s-{n % 3}", [ev(n)], expected_version=None)
    pages = [page async for page in store.scan(after=1, page=2)]
    assert [len(p) for p in pages] == [2, 2, 2]
    scanned = [e for p in pages for e in p]
    read = await store.read_all(after=1, limit=None)
    assert [e.position for e in scanned] == [e.position for e in read] == list(range(2, 8))
    for raw, full in zip(scanned, read, strict=True):
        # The text is the database's own; decoded, it is exactly what read_all returns.
        assert json.loads(raw.data) == full.data and json.loads(raw.metadata) == full.metadata
        assert (raw.event_id, raw.type, raw.hash, raw.prev_hash, raw.stream_id) == (
            full.event_id, full.type, full.hash, full.prev_hash, full.stream_id)
    only = [e async for p in store.scan(where=EventFilter(stream_ids=("s-1",))) for e in p]
    assert [json.loads(e.data)["n"] for e in only] == [1, 4]


async def test_a_scan_in_a_transaction_is_refused_at_commit_if_the_store_moved(
        store: EventStore) -> None:
    await store.append("s-1", [ev(1)], expected_version=0)
    with pytest.raises(ConcurrencyError):
        async with store.transaction() as tx:
            seen = [e async for p in tx.scan() for e in p]
            assert len(seen) == 1
            await store.append("s-2", [ev(2)], expected_version=0)  # lands after the scan
            await tx.append("s-3", [ev(3)], expected_version=0)
    assert [e.stream_id for e in await store.read_all()] == ["s-1", "s-2"]


async def test_a_sqlite_store_syncs_every_commit_to_disk(store: EventStore) -> None:
    """A power cut must not take back a commit the relay may have published (issue 15):
    SQLite's `synchronous` is FULL (2) on every connection the store opens. PostgreSQL's
    durability is the server's (`fsync`, `synchronous_commit`: on by default, off only on the
    tests' throwaway cluster): the store never lowers it for its sessions."""
    for engine in {store.engine, store.read_engine}:
        async with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar_one() == 2
            else:
                found = (await conn.exec_driver_sql(
                    "SELECT setting, reset_val FROM pg_settings "
                    "WHERE name = 'synchronous_commit'")).mappings().one()
                assert found["setting"] == found["reset_val"]  # the session's, the server's


async def test_only_a_commit_with_events_wakes_the_relay(store: EventStore) -> None:
    """D84: the relay waits for a commit of this process (`wait_for_commit`). A consumer's
    processed marks or a relay's own checkpoint have nothing to publish: they once woke it for
    a pass that found nothing (two after each batch it published). A commit with events does."""
    await store.append("s-wake", [ev(0)], expected_version=0)
    await store.wait_for_commit(0.001)  # the append's wake-up, taken
    waiter = asyncio.ensure_future(store.wait_for_commit(3600))
    async with store.transaction() as tx:
        await tx.mark_processed("a-consumer", "an-event", "trial.enrollment")
        await tx.save_checkpoint("kafka", 1)
    await store.save_checkpoint("kafka", 1)
    assert not store._committed.is_set()  # what wakes the waiter
    assert not waiter.done()
    await store.append("s-wake", [ev(1)], expected_version=1)
    await asyncio.wait_for(waiter, 30)  # woken


async def test_a_checkpoint_only_moves_forward(store: EventStore) -> None:
    """A checkpoint is made when first saved and never goes back: a late save of an older
    position (a relay's save behind one already made) leaves the newer. All a commit moves go
    in one statement, also when several transactions of one group commit move the same one."""
    assert await store.checkpoint("cp-a") == 0
    await store.save_checkpoint("cp-a", 5)
    await store.save_checkpoint("cp-a", 3)
    assert await store.checkpoint("cp-a") == 5
    async with store.transaction() as tx:  # two in one transaction, one of them new
        await tx.save_checkpoint("cp-a", 9)
        await tx.save_checkpoint("cp-b", 2)
    await asyncio.gather(*(store.save_checkpoint("cp-c", n) for n in (4, 8, 6, 1)))
    assert [await store.checkpoint(n) for n in ("cp-a", "cp-b", "cp-c")] == [9, 2, 8]
