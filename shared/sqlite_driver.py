"""aiosqlite under SQLAlchemy with one thread hop a statement instead of four (D67).

aiosqlite runs every call on the connection's own thread and hands the result back through the
event loop: a hop costs two thread wake-ups, a self-pipe write and a loop turn, 60 to 100 us of
CPU on this project's machine. SQLAlchemy's adapter makes four hops of each statement: create
the cursor, execute, fetch every row, close. A transaction of ten statements paid for forty,
and they were most of the CPU of a record consumed on SQLite (docs/benchmarks.md, targets 3 and
6). The cursor here does the four in one function on aiosqlite's thread: one hop, the same
rows, the same errors (raised in the thread, mapped by SQLAlchemy as before), the same
transaction (the same connection).

Two more hops a transaction are saved (D68): BEGIN goes to the thread with the transaction's
first statement, in its call (`defer_begin`), and the rollback SQLAlchemy's pool makes of every
connection it takes back is skipped when SQLite says no transaction is open.

It leans on two internals, aiosqlite's `Connection._execute` (queue a function on its thread)
and SQLAlchemy's `AsyncAdapt_dbapi_cursor._execute_async`/`_executemany_async`, both versions
pinned in requirements.lock. `module()` checks that they are there; without them the engine keeps
SQLAlchemy's own adapter (slower, the same behaviour), and
`tests/integration/test_sqlite_driver.py` fails to say so.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from typing import Any

import aiosqlite
from sqlalchemy.connectors.asyncio import AsyncAdapt_dbapi_cursor
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
    AsyncAdapt_aiosqlite_ss_cursor,
)
from sqlalchemy.util import EMPTY_DICT


class _Ran:
    """What the cursor reports once its statement ran on the thread (the sqlite3 cursor itself
    is closed there): description, rowcount, lastrowid."""

    __slots__ = ("arraysize", "description", "lastrowid", "rowcount")

    def __init__(self, cursor: sqlite3.Cursor | None) -> None:
        self.description = cursor.description if cursor is not None else None
        self.rowcount = cursor.rowcount if cursor is not None else -1
        self.lastrowid = cursor.lastrowid if cursor is not None else None
        self.arraysize = 1

    def close(self) -> None:
        """Closed on the thread already."""


def _execute(conn: sqlite3.Connection, operation: str, parameters: Any, begin: str | None
             ) -> tuple[_Ran, list[Any] | None]:
    """On aiosqlite's thread: the transaction's BEGIN if it is still to be sent, then the whole
    statement, rows and all."""
    if begin is not None:
        conn.execute(begin)
    cursor = conn.cursor()
    try:
        cursor.execute(operation, () if parameters is None else parameters)
        rows = cursor.fetchall() if cursor.description else None
        return _Ran(cursor), rows
    finally:
        cursor.close()


def _executemany(conn: sqlite3.Connection, operation: str, seq: Any, begin: str | None
                 ) -> _Ran:
    if begin is not None:
        conn.execute(begin)
    cursor = conn.cursor()
    try:
        cursor.executemany(operation, seq)
        return _Ran(cursor)
    finally:
        cursor.close()


class OneHopCursor(AsyncAdapt_aiosqlite_cursor):
    """SQLAlchemy's aiosqlite cursor, each statement one hop to aiosqlite's thread."""

    __slots__ = ()
    _awaitable_cursor_close = False  # nothing left open to close: `_Ran.close`

    def __init__(self, adapt_connection: Any) -> None:  # no hop to make a cursor up front
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = _Ran(None)  # type: ignore[assignment]  # quacks like one
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = deque()

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        async with self._adapt_connection._execute_mutex:
            ran, rows = await self._connection._execute(
                _execute, self._connection._conn, operation, parameters,
                _take_begin(self._connection))
            self._cursor = ran
            self._rows = deque(rows or ())
            return ran

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
        async with self._adapt_connection._execute_mutex:
            self._cursor = await self._connection._execute(
                _executemany, self._connection._conn, operation, seq_of_parameters,
                _take_begin(self._connection))
            return self._cursor


# The BEGIN a transaction is to start with, kept on aiosqlite's connection until the
# transaction's first statement, which takes it to the thread in that statement's hop
# (`defer_begin`).
_BEGIN = "_trial_pending_begin"


def _take_begin(connection: Any) -> str | None:  # aiosqlite.Connection
    begin: str | None = connection.__dict__.pop(_BEGIN, None)
    return begin


def defer_begin(dbapi_connection: Any, begin: str) -> bool:
    """Have `begin` (BEGIN, BEGIN IMMEDIATE) sent with the transaction's first statement, in that
    statement's hop, instead of a hop of its own; False for a connection that is not this
    driver's: send it now. A transaction that runs no statement sends none, and its commit or
    rollback makes no hop; a server-side cursor sends it first (`OneHopServerSideCursor`).
    Nothing is read or written before BEGIN either way: SQLite takes its locks and its snapshot
    at the first statement after BEGIN (IMMEDIATE: at BEGIN itself, which now runs just
    before that statement, on the same thread, in the same call)."""
    if not isinstance(dbapi_connection, OneHopConnection):
        return False
    dbapi_connection._connection.__dict__[_BEGIN] = begin
    return True


class OneHopServerSideCursor(AsyncAdapt_aiosqlite_ss_cursor):
    """SQLAlchemy's server-side cursor (rows fetched as read: a streamed export), which sends a
    deferred BEGIN first, a hop of its own, when it runs the transaction's first statement."""

    __slots__ = ()

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        begin = _take_begin(self._connection)
        if begin is not None:
            async with self._adapt_connection._execute_mutex:
                await self._connection._execute(self._connection._conn.execute, begin)
        return await super()._execute_async(operation, parameters)


class OneHopConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()
    _cursor_cls = OneHopCursor
    _ss_cursor_cls = OneHopServerSideCursor

    def commit(self) -> None:
        if _take_begin(self._connection) is None:  # else no statement ran: nothing to commit
            super().commit()

    def rollback(self) -> None:
        """Roll back, without a hop when no transaction is open. SQLAlchemy's pool rolls back
        every connection it takes back, also one whose transaction has just committed: on a
        group commit that was one hop in seven for nothing. SQLite itself says whether a
        transaction is open (`in_transaction`, a flag read without the thread); unsure, the
        rollback runs. A BEGIN never sent (no statement ran) is dropped."""
        if _take_begin(self._connection) is not None:
            return
        try:
            open_ = self._connection._conn.in_transaction
        except (ValueError, sqlite3.Error):  # closed, or not readable here: ask the thread
            open_ = True
        if open_:
            super().rollback()


class OneHopDbapi(AsyncAdapt_aiosqlite_dbapi):
    """The DBAPI module SQLAlchemy's aiosqlite dialect uses, handing out `OneHopConnection`s."""

    def connect(self, *arg: Any, **kw: Any) -> AsyncAdapt_aiosqlite_connection:
        connection = super().connect(*arg, **kw)
        connection.__class__ = OneHopConnection  # same slots: only methods differ
        return connection


def supported() -> bool:
    """Whether the internals the one-hop cursor relies on are where it expects them."""
    return (callable(getattr(aiosqlite.Connection, "_execute", None))
            and isinstance(getattr(aiosqlite.Connection, "_conn", None), property)
            and callable(getattr(AsyncAdapt_dbapi_cursor, "_execute_async", None))
            and callable(getattr(AsyncAdapt_dbapi_cursor, "_executemany_async", None))
            and "_cursor_cls" in vars(AsyncAdapt_aiosqlite_connection)
            and "_ss_cursor_cls" in vars(AsyncAdapt_aiosqlite_connection))


def module() -> OneHopDbapi | None:
    """The DBAPI module for `create_async_engine(module=...)`, or None: SQLAlchemy's own."""
    return OneHopDbapi(aiosqlite, sqlite3) if supported() else None
