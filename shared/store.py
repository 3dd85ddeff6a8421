"""The append-only, hash-chained event store: one table, one write lock, two backends."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.db import create_engine, is_sqlite
from shared.errors import ConcurrencyError
from shared.events import CloudEvent, EventData, canonical_json, model_for
from shared.schema import checkpoints, events, processed_events

GENESIS_HASH = "0" * 64
# Any fixed 64-bit number: PostgreSQL's advisory lock that serialises appends to one store.
_APPEND_LOCK_KEY = 7_301_000_001


__all__ = ["ConcurrencyError", "EventFilter", "EventStore", "Metadata", "NewEvent",
           "RecordedEvent", "Transaction"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class Metadata:
    """Who did it and why: travels with every event into the audit trail."""

    actor: str | None = None
    role: str | None = None
    site: str | None = None
    request_id: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class NewEvent:
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    schema_version: int = 1

    @classmethod
    def of(cls, payload: EventData, metadata: Metadata | None = None,
           event_id: str | None = None) -> NewEvent:
        return cls(
            type=payload.event_type(),
            data=payload.model_dump(mode="json"),
            metadata=(metadata or Metadata()).as_dict(),
            event_id=event_id or str(uuid.uuid4()),
            schema_version=payload.schema_version,
        )


@dataclass(frozen=True)
class RecordedEvent:
    position: int
    stream_id: str
    stream_version: int
    event_id: str
    type: str
    schema_version: int
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime
    prev_hash: str
    hash: str

    def payload(self) -> EventData:
        return model_for(self.type).model_validate(self.data)

    def to_cloudevent(self, source: str) -> CloudEvent:
        m = self.metadata
        return CloudEvent(
            id=self.event_id,
            source=source,
            type=self.type,
            subject=self.payload().subject(),
            time=self.recorded_at,
            data=self.data,
            schemaversion=self.schema_version,
            sequence=self.position,
            correlationid=m.get("correlation_id") or m.get("request_id"),
            causationid=m.get("causation_id"),
            actor=m.get("actor"),
            actorrole=m.get("role"),
            actorsite=m.get("site"),
            reason=m.get("reason"),
        )


def event_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """SHA-256 over the previous hash and the canonical JSON of everything the event says."""
    content = {
        "position": row["position"],
        "stream_id": row["stream_id"],
        "stream_version": row["stream_version"],
        "event_id": row["event_id"],
        "type": row["type"],
        "schema_version": row["schema_version"],
        "data": row["data"],
        "metadata": row["metadata"],
        "recorded_at": as_utc(row["recorded_at"]).isoformat(timespec="microseconds"),
    }
    return hashlib.sha256((prev_hash + canonical_json(content)).encode()).hexdigest()


def _to_recorded(row: sa.Row[Any]) -> RecordedEvent:
    m = row._mapping
    return RecordedEvent(
        position=m["position"],
        stream_id=m["stream_id"],
        stream_version=m["stream_version"],
        event_id=m["event_id"],
        type=m["type"],
        schema_version=m["schema_version"],
        data=m["data"],
        metadata=m["metadata"],
        recorded_at=as_utc(m["recorded_at"]),
        prev_hash=m["prev_hash"],
        hash=m["hash"],
    )


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    events_checked: int
    first_broken_position: int | None
    first_hash: str | None = None  # the first walked row's hash (position 1's names the chain)
    last_hash: str | None = None   # the hash at `events_checked`, when the chain verified


class StreamReader(Protocol):
    async def read_stream(self, stream_id: str) -> list[RecordedEvent]: ...


@dataclass(frozen=True)
class EventFilter:
    """Which events a read returns (every condition must hold; unset ones hold for all).

    Metadata conditions compare the text of one metadata key: equal to a value, or within
    [low, high) (either bound may be None), as the audit ledger's filters on time need.
    """

    stream_ids: tuple[str, ...] | None = None
    types: tuple[str, ...] | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    metadata_range: Mapping[str, tuple[str | None, str | None]] = field(default_factory=dict)

    def clauses(self) -> list[sa.ColumnElement[bool]]:
        meta = events.c.metadata
        found: list[sa.ColumnElement[bool]] = []
        if self.stream_ids is not None:
            found.append(events.c.stream_id.in_(self.stream_ids))
        if self.types is not None:
            found.append(events.c.type.in_(self.types))
        found += [meta[key].as_string() == value for key, value in self.metadata.items()]
        for key, (low, high) in self.metadata_range.items():
            if low is not None:
                found.append(meta[key].as_string() >= low)
            if high is not None:
                found.append(meta[key].as_string() < high)
        return found


EVERYTHING = EventFilter()


def _after(after: int, limit: int | None, where: EventFilter) -> sa.Select[Any]:
    q = events.select().where(events.c.position > after, *where.clauses()).order_by(
        events.c.position)
    return q if limit is None else q.limit(limit)


class Transaction:
    """One write transaction holding the store's append lock: appends, reads, consumer bookkeeping."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.appended: list[RecordedEvent] = []

    async def stream_version(self, stream_id: str) -> int:
        q = sa.select(sa.func.coalesce(sa.func.max(events.c.stream_version), 0)).where(
            events.c.stream_id == stream_id)
        return int((await self.conn.execute(q)).scalar_one())

    async def read_stream(self, stream_id: str) -> list[RecordedEvent]:
        q = events.select().where(events.c.stream_id == stream_id).order_by(events.c.stream_version)
        return [_to_recorded(r) for r in await self.conn.execute(q)]

    async def read_all(self, after: int = 0, limit: int | None = None,
                       where: EventFilter = EVERYTHING) -> list[RecordedEvent]:
        """Events after position `after`, in position order, inside this transaction."""
        return [_to_recorded(r) for r in await self.conn.execute(_after(after, limit, where))]

    async def has_event(self, event_id: str) -> bool:
        q = sa.select(sa.literal(1)).where(events.c.event_id == event_id)
        return (await self.conn.execute(q)).first() is not None

    async def append(self, stream_id: str, new_events: Sequence[NewEvent],
                     expected_version: int | None) -> list[RecordedEvent]:
        """Append at `expected_version` (events already in the stream; None: don't check)."""
        version = await self.stream_version(stream_id)
        if expected_version is not None and version != expected_version:
            raise ConcurrencyError(stream_id, expected_version, version)
        head = (await self.conn.execute(
            sa.select(events.c.position, events.c.hash).order_by(events.c.position.desc()).limit(1)
        )).first()
        position, prev_hash = (head[0], head[1]) if head else (0, GENESIS_HASH)
        rows = []
        now = utcnow()
        for offset, new in enumerate(new_events, start=1):
            row: dict[str, Any] = {
                "position": position + offset,
                "stream_id": stream_id,
                "stream_version": version + offset,
                "event_id": new.event_id,
                "type": new.type,
                "schema_version": new.schema_version,
                "data": new.data,
                "metadata": new.metadata,
                "recorded_at": now,
                "prev_hash": prev_hash,
            }
            row["hash"] = prev_hash = event_hash(row["prev_hash"], row)
            rows.append(row)
        if not rows:
            return []
        try:
            await self.conn.execute(events.insert(), rows)
        except IntegrityError as exc:  # a writer outside this lock, or a reused event id
            raise ConcurrencyError(stream_id, expected_version, version) from exc
        recorded = [
            RecordedEvent(**{**r, "recorded_at": as_utc(r["recorded_at"])}) for r in rows
        ]
        self.appended.extend(recorded)
        return recorded

    async def count_of_type(self, event_type: str) -> int:
        q = sa.select(sa.func.count()).select_from(events).where(events.c.type == event_type)
        return int((await self.conn.execute(q)).scalar_one())

    async def was_processed(self, consumer: str, event_id: str) -> bool:
        q = sa.select(sa.literal(1)).where(
            processed_events.c.consumer == consumer, processed_events.c.event_id == event_id)
        return (await self.conn.execute(q)).first() is not None

    async def mark_processed(self, consumer: str, event_id: str, topic: str) -> None:
        await self.conn.execute(processed_events.insert().values(
            consumer=consumer, event_id=event_id, topic=topic, processed_at=utcnow()))

    async def checkpoint(self, name: str) -> int:
        q = sa.select(checkpoints.c.position).where(checkpoints.c.name == name)
        return int((await self.conn.execute(q)).scalar_one_or_none() or 0)

    async def save_checkpoint(self, name: str, position: int) -> None:
        """Move the checkpoint forward (never back, should two relays race)."""
        updated = await self.conn.execute(
            checkpoints.update().where(checkpoints.c.name == name,
                                       checkpoints.c.position < position)
            .values(position=position, updated_at=utcnow()))
        if updated.rowcount == 0 and await self.checkpoint(name) == 0:
            await self.conn.execute(checkpoints.insert().values(
                name=name, position=position, updated_at=utcnow()))


# Work that must commit together with whatever the current request appends, in the same
# transaction: set for one request (the idempotency key's "written" mark, D25), empty elsewhere.
BeforeCommit = Callable[[AsyncConnection], Awaitable[None]]
before_commit: ContextVar[tuple[BeforeCommit, ...]] = ContextVar("before_commit", default=())


class EventStore:
    """A service's event store. Every write goes through `transaction()`, which holds one lock.

    Holding a store-wide lock from the first read of the head to COMMIT means positions are
    handed out in commit order with no gaps, so a relay reading `position > checkpoint` can never
    skip an event that commits late. The append rate of one trial is far below what one lock
    serves; see docs/decisions.md.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite = is_sqlite(url)
        self.engine: AsyncEngine = create_engine(url, immediate=True)
        # SQLite readers must not take the write lock; PostgreSQL shares one pool.
        self.read_engine: AsyncEngine = (
            create_engine(url, immediate=False) if self.sqlite else self.engine)
        self._lock = asyncio.Lock()
        self._committed = asyncio.Event()

    async def close(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        # The in-process lock keeps one process's writers from queueing inside the database.
        async with self._lock, self.engine.begin() as conn:
            if not self.sqlite:
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"),
                                   {"k": _APPEND_LOCK_KEY})
            tx = Transaction(conn)
            yield tx
            if tx.appended:
                for hook in before_commit.get():
                    await hook(conn)
        if tx.appended:
            self._committed.set()

    async def append(self, stream_id: str, new_events: Sequence[NewEvent],
                     expected_version: int | None) -> list[RecordedEvent]:
        async with self.transaction() as tx:
            return await tx.append(stream_id, new_events, expected_version)

    async def wait_for_commit(self, timeout: float) -> None:
        """Wake the relay when this process commits; `timeout` covers other writers."""
        try:
            await asyncio.wait_for(self._committed.wait(), timeout)
        except TimeoutError:
            pass
        self._committed.clear()

    async def read_stream(self, stream_id: str) -> list[RecordedEvent]:
        async with self.read_engine.connect() as conn:
            q = events.select().where(events.c.stream_id == stream_id).order_by(
                events.c.stream_version)
            return [_to_recorded(r) for r in await conn.execute(q)]

    async def read_all(self, after: int = 0, limit: int | None = 1000,
                       where: EventFilter = EVERYTHING) -> list[RecordedEvent]:
        """Events after position `after` that match `where`, in position order."""
        async with self.read_engine.connect() as conn:
            return [_to_recorded(r) for r in await conn.execute(_after(after, limit, where))]

    async def stream_ids(self, event_type: str) -> list[str]:
        """Every stream holding at least one event of `event_type`, sorted."""
        q = sa.select(events.c.stream_id).where(events.c.type == event_type).distinct()
        async with self.read_engine.connect() as conn:
            return sorted(r[0] for r in await conn.execute(q))

    async def hashes_at(self, positions: Iterable[int]) -> dict[int, str]:
        """The hash stored at each of these positions (a position past the head is absent)."""
        wanted = sorted(set(positions))
        found: dict[int, str] = {}
        async with self.read_engine.connect() as conn:
            for i in range(0, len(wanted), 500):
                rows = await conn.execute(sa.select(events.c.position, events.c.hash).where(
                    events.c.position.in_(wanted[i:i + 500])))
                found.update({int(p): str(h) for p, h in rows})
        return found

    async def head(self) -> int:
        async with self.read_engine.connect() as conn:
            q = sa.select(sa.func.coalesce(sa.func.max(events.c.position), 0))
            return int((await conn.execute(q)).scalar_one())

    async def checkpoint(self, name: str) -> int:
        async with self.read_engine.connect() as conn:
            return await Transaction(conn).checkpoint(name)

    async def verify(self, batch: int = 1000, after: int = 0,
                     after_hash: str = GENESIS_HASH) -> VerifyResult:
        """Walk the chain from the start; name the first position whose row or link is wrong.

        `after` and `after_hash` walk only the rest of a chain whose start was verified before
        (and is witnessed elsewhere): `events_checked` then counts the rows after `after`.
        """
        prev_hash, expected_position, checked, first = after_hash, after + 1, 0, None
        async with self.read_engine.connect() as conn:
            while True:
                q = events.select().where(events.c.position >= expected_position).order_by(
                    events.c.position).limit(batch)
                rows = [dict(r._mapping) for r in await conn.execute(q)]
                if not rows:
                    return VerifyResult(True, checked, None, first,
                                        prev_hash if checked else None)
                for row in rows:
                    if (row["position"] != expected_position or row["prev_hash"] != prev_hash
                            or event_hash(prev_hash, row) != row["hash"]):
                        return VerifyResult(False, checked, expected_position, first)
                    prev_hash, expected_position, checked = row["hash"], expected_position + 1, \
                        checked + 1
                    first = first or row["hash"]
