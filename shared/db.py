"""Engines for the two backends: SQLite (aiosqlite, embedded default) and PostgreSQL (asyncpg)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from shared import sqlite_driver

# Every SQLite connection's settings. FULL: each commit's WAL is on disk before the commit
# returns. NORMAL (WAL's usual choice) may lose the last commits to a power cut, after the relay
# has published them: the broker would hold events the store no longer has, and their positions
# would be used again by others (issue 15). A group commit pays one fsync for all it writes
# (0.26 ms a commit measured here).
SQLITE_PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL",
                  "PRAGMA busy_timeout=60000", "PRAGMA wal_autocheckpoint=256")


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def create_engine(url: str, *, immediate: bool = True, **kwargs: Any) -> AsyncEngine:
    """An async engine. On SQLite, `immediate` transactions take the write lock at BEGIN.

    pysqlite's own transaction handling begins lazily and defers locks, which turns concurrent
    writers into "database is locked" errors halfway through; we issue BEGIN ourselves. With the
    one-hop driver it goes to SQLite with the transaction's first statement (D68): a transaction
    holds the write lock from its first statement, so one that must hold it before doing
    anything (a test standing in for another replica's commit) runs a statement first.
    """
    # Connections kept open for as many concurrent requests as a busy service sees; past them a
    # connection is opened and closed for one use (on SQLite a thread, four PRAGMAs and the
    # functions each time: the default five kept made that every read past the fifth, D75).
    # The ceiling, 30 an engine, is what it was on PostgreSQL (15 on SQLite before).
    kwargs.setdefault("pool_size", 20)
    kwargs.setdefault("max_overflow", 10)
    if not is_sqlite(url):
        # A connection is pinged at checkout only when it sat in the pool for a while (D82):
        # SQLAlchemy's pre-ping on asyncpg is three round trips (BEGIN, ";", ROLLBACK) on every
        # checkout, and a randomization, a group commit and a relay pass each check out one.
        kwargs.setdefault("pool_pre_ping", False)
        # A custom plan for every statement: asyncpg prepares and reuses statements, and after
        # five runs PostgreSQL may settle on a generic plan; for the store's reads by stream
        # (`position > $1 AND stream_id IN (...) ORDER BY position LIMIT $2`) that plan walks
        # the primary key, milliseconds where the stream index takes microseconds.
        kwargs.setdefault("connect_args", {"server_settings": {
            "plan_cache_mode": "force_custom_plan"}})
        engine = create_async_engine(url, **kwargs)
        if not kwargs["pool_pre_ping"]:
            _ping_when_idle(engine)
        return engine

    path = sa.engine.make_url(url).database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    one_hop = sqlite_driver.module() if sa.engine.make_url(url).drivername == (
        "sqlite+aiosqlite") else None
    if one_hop is not None:  # a statement one thread hop, not four (D67)
        kwargs.setdefault("module", one_hop)
    engine = create_async_engine(url, connect_args={"timeout": 60}, **kwargs)
    begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # With the one-hop driver, sent with the transaction's first statement (D68).
        if not sqlite_driver.defer_begin(connection.connection.dbapi_connection, begin):
            connection.exec_driver_sql(begin)

    return engine


# Longer idle than this and a connection is pinged before use: a database restart or a dropped
# socket takes longer than a second to come back from, so a connection in use within the last
# second was working and one idle across an outage is found out before a request uses it. One
# that fails anyway (the database gone within the second) fails its statement, which SQLAlchemy
# reports as a disconnect and answers by invalidating the whole pool; the caller retries (a
# consumer) or answers 503 (a request), as for any statement cut off by an outage.
PING_AFTER_IDLE_S = 1.0


def _ping_when_idle(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since <= PING_AFTER_IDLE_S:
            return  # just opened, or used within the second
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # the pool drops it and checks out another (SQLAlchemy's own)
            raise sa.exc.DisconnectionError(f"a pooled connection failed its ping: {exc!r}") from exc
