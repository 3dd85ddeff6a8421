"""The embedded database's driver: SQLAlchemy over aiosqlite, one thread hop a statement (D67).

On a real SQLite file, whatever backend the suite runs on: the embedded default is SQLite, and
every service's store goes through this driver there."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import sqlite_driver
from shared.db import create_engine


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    made = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'driver.db'}")
    async with made.begin() as conn:
        await conn.exec_driver_sql(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, n INTEGER)")
    yield made
    await made.dispose()


@pytest.fixture
async def reader(engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """A reading engine on the same file, as the store's (plain BEGIN, no write lock)."""
    made = create_engine(str(engine.url), immediate=False)
    yield made
    await made.dispose()


def test_the_pinned_libraries_still_have_what_the_one_hop_cursor_needs() -> None:
    """Should an upgrade of aiosqlite or SQLAlchemy move the internals, the engine falls back to
    SQLAlchemy's own four-hop cursor: correct, and slower on every statement. Say it here."""
    assert sqlite_driver.supported()
    assert isinstance(sqlite_driver.module(), sqlite_driver.OneHopDbapi)


async def test_the_engine_uses_the_one_hop_connection(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        assert isinstance(raw.dbapi_connection, sqlite_driver.OneHopConnection)


async def test_a_statement_is_one_hop_to_the_database_thread(
        engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    async with engine.connect() as conn:
        await conn.exec_driver_sql("SELECT 1")  # the connection's own set-up done
        hops = count_hops(monkeypatch)
        rows = (await conn.execute(sa.text("SELECT name FROM t WHERE id > :n"), {"n": 0})).all()
        await conn.execute(sa.text("INSERT INTO t (name, n) VALUES (:a, :n)"),
                           [{"a": "x", "n": 1}, {"a": "y", "n": 2}])
    assert rows == []
    # One hop for the select, one for the insert, one for the rollback as the connection goes
    # back to the pool; SQLAlchemy's own cursor made four a statement (cursor, execute, fetch,
    # close).
    assert hops == ["_execute", "_executemany", "rollback"]


def count_hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions aiosqlite runs on its thread from now on, one a hop."""
    hops: list[str] = []
    real = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: object, *args: object,
                      **kwargs: object) -> object:
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await real(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    return hops


async def test_a_committed_connection_goes_back_to_the_pool_without_a_rollback(
        engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLAlchemy's pool rolls back every connection it takes back; after a commit there is
    nothing to roll back, and no hop is made for it (a group commit's seventh)."""
    async with engine.connect() as conn:
        await conn.exec_driver_sql("SELECT 1")
    hops = count_hops(monkeypatch)
    async with engine.begin() as conn:
        await conn.execute(sa.text("INSERT INTO t (name, n) VALUES ('kept', 1)"))
    assert hops == ["_execute", "commit"]  # BEGIN IMMEDIATE with the INSERT (D68), COMMIT
    async with engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT name FROM t"))).scalars().all() == ["kept"]


async def test_a_transaction_that_runs_no_statement_makes_no_hop(
        engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    async with engine.connect() as conn:
        await conn.exec_driver_sql("SELECT 1")
    hops = count_hops(monkeypatch)
    async with engine.begin():
        pass
    async with engine.connect() as conn:
        await conn.begin()
        await conn.rollback()
    assert hops == []


async def test_begin_immediate_holds_the_write_lock_from_the_first_statement(
        engine: AsyncEngine, tmp_path: Path) -> None:
    """The deferred BEGIN IMMEDIATE runs just before the transaction's first statement, in its
    hop: from then on no other connection can start writing until it commits."""
    other = sqlite3.connect(tmp_path / "driver.db", timeout=0, isolation_level=None)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("SELECT count(*) FROM t"))
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            await conn.execute(sa.text("INSERT INTO t (name, n) VALUES ('mine', 1)"))
        other.execute("BEGIN IMMEDIATE")  # free again once committed
        assert other.execute("SELECT name FROM t").fetchall() == [("mine",)]
        other.execute("ROLLBACK")
    finally:
        other.close()


async def test_a_read_transaction_sees_one_snapshot_from_its_first_statement(
        engine: AsyncEngine, reader: AsyncEngine) -> None:
    """BEGIN still comes before the first read (a read in autocommit would see each commit as it
    lands): two reads in one transaction see the same store while another connection commits
    between them."""
    count = sa.text("SELECT count(*) FROM t")
    async with reader.connect() as read:
        assert (await read.execute(count)).scalar_one() == 0
        async with engine.begin() as conn:
            await conn.execute(sa.text("INSERT INTO t (name) VALUES ('late')"))
        assert (await read.execute(count)).scalar_one() == 0  # the first read's snapshot
    async with reader.connect() as read:
        assert (await read.execute(count)).scalar_one() == 1


async def test_a_streamed_read_sends_the_deferred_begin_first(
        engine: AsyncEngine, reader: AsyncEngine) -> None:
    """A server-side cursor (SQLAlchemy's own, knowing nothing of the deferred BEGIN) as the
    transaction's first statement: the BEGIN is sent before it, so the stream reads one
    snapshot too."""
    async with engine.begin() as conn:
        await conn.exec_driver_sql("INSERT INTO t (name) VALUES (?)", [(f"r{i}",) for i in range(5)])
    async with reader.connect() as read:
        rows = await read.stream(sa.text("SELECT name FROM t ORDER BY id"))
        driver = (await read.get_raw_connection()).driver_connection
        assert driver is not None and driver._conn.in_transaction
        async with engine.begin() as conn:
            await conn.execute(sa.text("INSERT INTO t (name) VALUES ('late')"))
        assert len([r async for r in rows]) == 5
        assert (await read.execute(sa.text("SELECT count(*) FROM t"))).scalar_one() == 5


async def test_a_transaction_open_behind_sqlalchemys_back_is_still_rolled_back_on_return(
        engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rollback is skipped only when SQLite says no transaction is open: one begun on the
    driver itself, unknown to SQLAlchemy, is rolled back as the connection goes back, and what
    it wrote is gone."""
    hops = count_hops(monkeypatch)
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        await driver.execute("BEGIN")
        await driver.execute("INSERT INTO t (name, n) VALUES ('ghost', 1)")
    assert hops[-1] == "rollback"
    async with engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT count(*) FROM t"))).scalar_one() == 0


async def test_rows_counts_and_ids_come_back_as_sqlite_gives_them(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        first = await conn.execute(sa.text("INSERT INTO t (name, n) VALUES ('a', 1)"))
        assert first.lastrowid == 1 and first.rowcount == 1
        many = await conn.exec_driver_sql("INSERT INTO t (name, n) VALUES (?, ?)",
                                          [("b", 2), ("c", 3), ("d", None)])
        assert many.rowcount == 3
        updated = await conn.execute(sa.text("UPDATE t SET n = n + 10 WHERE n IS NOT NULL"))
        assert updated.rowcount == 3
    async with engine.connect() as conn:
        result = await conn.execute(sa.text("SELECT id, name, n FROM t ORDER BY id"))
        assert list(result.keys()) == ["id", "name", "n"]
        assert [tuple(r) for r in result] == [(1, "a", 11), (2, "b", 12), (3, "c", 13),
                                              (4, "d", None)]
        assert (await conn.execute(sa.text("SELECT n FROM t WHERE id = 99"))).first() is None
        assert (await conn.execute(sa.text("SELECT count(*) FROM t"))).scalar_one() == 4


async def test_a_failed_statement_is_sqlalchemys_error_and_the_transaction_is_undone(
        engine: AsyncEngine) -> None:
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(sa.text("INSERT INTO t (name, n) VALUES ('dup', 1)"))
            await conn.execute(sa.text("INSERT INTO t (name, n) VALUES ('dup', 2)"))
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await conn.exec_driver_sql("INSERT INTO t (name) VALUES (?)", [("e",), ("e",)])
    async with engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT count(*) FROM t"))).scalar_one() == 0
        # The connection is still good after the errors.
        await conn.execute(sa.text("INSERT INTO t (name, n) VALUES ('ok', 1)"))
        assert (await conn.execute(sa.text("SELECT name FROM t"))).scalars().all() == ["ok"]


async def test_a_streamed_result_still_reads_every_row(engine: AsyncEngine) -> None:
    """Server-side cursors (a streamed export) keep SQLAlchemy's own cursor."""
    async with engine.begin() as conn:
        await conn.exec_driver_sql("INSERT INTO t (name, n) VALUES (?, ?)",
                                   [(f"r{i}", i) for i in range(250)])
    async with engine.connect() as conn:
        streamed = await conn.stream(sa.text("SELECT n FROM t ORDER BY n"))
        assert [r[0] async for r in streamed] == list(range(250))
