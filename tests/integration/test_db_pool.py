"""The engine's pool (shared/db.py, D82): a connection idle for more than a second is pinged at
checkout, and one that fails its ping is replaced before any caller uses it; a connection used
within the second is not pinged (asyncpg's ping is three round trips a checkout).

On the suite's backend. On PostgreSQL the idle connection's server process is terminated, as a
restart or a dropped socket would; SQLite's connections cannot be cut, and the engine does not
ping them in production, so there the same pool logic is put on the engine and the ping fails as
a dead connection's would."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from shared import db


async def _raw(conn: AsyncConnection) -> Any:
    """The DBAPI connection under `conn`, the one the pool hands out and replaces."""
    return (await conn.get_raw_connection()).dbapi_connection


async def test_an_idle_connection_that_died_is_replaced_before_use_and_a_busy_one_not_pinged(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sqlite = db.is_sqlite(database_url)
    engine = db.create_engine(database_url)
    if sqlite:
        db._ping_when_idle(engine)
    pings: list[Any] = []
    real_ping = engine.dialect.do_ping

    def ping(dbapi_connection: Any) -> bool:
        pings.append(dbapi_connection)
        if sqlite and len(pings) == 1:
            raise sa.exc.OperationalError("ping", {}, Exception("the connection is gone"))
        return bool(real_ping(dbapi_connection))

    monkeypatch.setattr(engine.dialect, "do_ping", ping)
    try:
        async with engine.connect() as conn:
            first = await _raw(conn)
            pid = None if sqlite else (await conn.execute(sa.text("SELECT pg_backend_pid()"))
                                       ).scalar_one()
        async with engine.connect() as conn:
            assert await _raw(conn) is first  # the pool's one connection, back within the second
        assert pings == []

        if pid is not None:  # the server ends it while it sits in the pool
            other_engine = create_async_engine(database_url, poolclass=sa.NullPool)
            async with other_engine.connect() as other:
                assert (await other.execute(sa.text("SELECT pg_terminate_backend(:pid)"),
                                            {"pid": pid})).scalar_one() is True
            await other_engine.dispose()
        monkeypatch.setattr(db, "PING_AFTER_IDLE_S", -1.0)  # every pooled connection now idle
        async with engine.connect() as conn:
            assert (await conn.execute(sa.text("SELECT 41 + 1"))).scalar_one() == 42
            replacement = await _raw(conn)
        assert pings[0] is first and replacement is not first
    finally:
        await engine.dispose()
