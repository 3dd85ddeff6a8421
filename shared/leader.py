"""One holder at a time, across every process on one store: which replica's relay publishes,
and whether the process that claimed an idempotency key is still alive (D53, D57).

Two replicas of a service share one database (issue 15); each runs a relay, and two relays
reading the same events would publish each twice. A relay publishes only while it holds the
store's lock for its name, taken without waiting and held for as long as the process lives:

- PostgreSQL: a session advisory lock (`pg_try_advisory_lock`) on a connection of its own. The
  database releases it when that connection ends, so a replica killed with -9, or cut off by a
  database restart, lets another take over at once; no lease to time out.
- SQLite: `flock` on a file beside the database. The kernel releases it when the process ends.

The holder checks it still holds the lock (its connection is alive) before every batch, so a
relay whose lock went with a database restart stops before another could publish the same events.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from pathlib import Path
from typing import IO

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.store import EventStore

log = logging.getLogger(__name__)


def lock_key(name: str) -> int:
    """A signed 64-bit advisory lock key for `name` (never the store's append lock: that one
    is taken per transaction, this per session, and a collision would only delay; still, a
    hash of a prefixed name keeps them apart)."""
    digest = hashlib.sha256(f"trial-leader:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Leadership:
    """The lock named `name` on `store`'s database, held by at most one process at a time."""

    def __init__(self, store: EventStore, name: str) -> None:
        self.store = store
        self.name = name
        self._conn: AsyncConnection | None = None  # PostgreSQL: the session holding the lock
        self._file: IO[bytes] | None = None  # SQLite: the locked file, open while held

    @property
    def held(self) -> bool:
        return self._conn is not None or self._file is not None

    async def hold(self) -> bool:
        """Whether this process holds the lock now: takes it if it is free, checks it is still
        ours if we had it (a dead connection means the database let it go). Never waits."""
        if self.store.sqlite:
            return self._hold_file()
        if self._conn is not None:
            try:
                await self._conn.execute(sa.text("SELECT 1"))
                return True
            except Exception as exc:
                log.warning("leadership %s lost with its connection: %r", self.name, exc)
                await self.release()
        conn = await self.store.engine.connect()
        try:
            # Autocommit: the lock is the session's, and the connection never sits idle in a
            # transaction between checks.
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            got = (await conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"),
                                      {"key": lock_key(self.name)})).scalar_one()
        except BaseException:
            await conn.close()
            raise
        if not got:
            await conn.close()
            return False
        self._conn = conn
        log.info("leadership %s taken", self.name)
        return True

    def _hold_file(self) -> bool:
        if self._file is not None:
            return True
        database = make_url(self.store.url).database or ""
        path = Path(f"{database}.{self.name}.leader")
        handle = path.open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
        self._file = handle
        log.info("leadership %s taken", self.name)
        return True

    async def release(self, forget: bool = False) -> None:
        """Let the lock go (at stop, or when its connection failed); never raises. `forget`:
        also remove SQLite's lock file (a lock no process will take again, an instance's)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"),
                                   {"key": lock_key(self.name)})
            with contextlib.suppress(Exception):
                await conn.close()
        handle, self._file = self._file, None
        if handle is not None:
            if forget:
                with contextlib.suppress(OSError):
                    os.unlink(handle.name)
            with contextlib.suppress(OSError):
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()


async def held_elsewhere(store: EventStore, name: str) -> bool:
    """Whether another process holds the lock `name` now, that is, is alive: the lock goes
    with its holder. A probe that gets the lock lets it go (and forgets it) at once."""
    probe = Leadership(store, name)
    if await probe.hold():
        await probe.release(forget=True)
        return False
    return True
