"""The append-only, hash-chained event store: one table, one group commit, two backends."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, Protocol, cast

import asyncpg
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.db import create_engine, is_sqlite
from shared.errors import ConcurrencyError
from shared.events import CloudEvent, EventData, canonical_json, model_for
from shared.schema import checkpoints, events, processed_events
from shared.timing import timed
from shared.tracing import with_traceparent

GENESIS_HASH = "0" * 64
# Any fixed 64-bit number: PostgreSQL's advisory lock that serialises appends to one store.
_APPEND_LOCK_KEY = 7_301_000_001


__all__ = ["ConcurrencyError", "EventFilter", "EventStore", "Metadata", "NewEvent",
           "RawEvent", "RecordedEvent", "StagedRead", "Transaction"]


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
            # the writing request's (or consumer's) trace context: the relay publishes later
            metadata=with_traceparent((metadata or Metadata()).as_dict()),
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

    def to_cloudevent(self, source: str, payload: EventData | None = None) -> CloudEvent:
        """The event as published; `payload` saves parsing it again when the caller has it."""
        m = self.metadata
        return CloudEvent(
            id=self.event_id,
            source=source,
            type=self.type,
            subject=(payload or self.payload()).subject(),
            time=self.recorded_at,
            # A type with a published form of its own (D51) publishes that form's data; every
            # other event its stored data, as is.
            data=self.data if payload is None or type(payload).published is EventData.published
            else payload.published().model_dump(mode="json"),
            schemaversion=self.schema_version,
            sequence=self.position,
            correlationid=m.get("correlation_id") or m.get("request_id"),
            causationid=m.get("causation_id"),
            actor=m.get("actor"),
            actorrole=m.get("role"),
            actorsite=m.get("site"),
            reason=m.get("reason"),
        )


class RawEvent(NamedTuple):
    """A stored event as the database holds it, `data` and `metadata` still JSON text: what a
    replay or an export reads, where decoding every row into a `RecordedEvent` first would cost
    more than the SQL (docs/benchmarks.md, targets 5 and 6). Decode only what is used."""

    position: int
    stream_id: str
    stream_version: int
    event_id: str
    type: str
    schema_version: int
    data: str
    metadata: str
    recorded_at: datetime
    prev_hash: str
    hash: str

    def payload(self) -> EventData:
        """The typed event, validated straight from the stored text (pydantic's JSON parser)."""
        return model_for(self.type).model_validate_json(self.data)


_RAW_COLUMNS = (events.c.position, events.c.stream_id, events.c.stream_version,
                events.c.event_id, events.c.type, events.c.schema_version,
                sa.cast(events.c.data, sa.Text).label("data"),
                sa.cast(events.c.metadata, sa.Text).label("metadata"),
                events.c.recorded_at, events.c.prev_hash, events.c.hash)
SCAN_PAGE = 5000


def _scan_page(after: int, where: EventFilter, page: int) -> sa.Select[Any]:
    return sa.select(*_RAW_COLUMNS).where(events.c.position > after, *where.clauses()).order_by(
        events.c.position).limit(page)


async def _scan(conn: AsyncConnection, after: int, where: EventFilter, page: int
                ) -> AsyncIterator[list[RawEvent]]:
    while True:
        rows = [RawEvent._make(r) for r in await conn.execute(_scan_page(after, where, page))]
        if rows:
            yield rows
        if len(rows) < page:
            return
        after = rows[-1].position


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


# The events' columns as `verify` reads them: the data and metadata as the very text stored.
_AS_STORED = tuple(sa.cast(c, sa.Text).label(c.name) if c.name in ("data", "metadata") else c
                   for c in events.c)


def _stored_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """`event_hash` of a row read by `_AS_STORED`, over its data and metadata as the text the
    table holds, which every writer stores as the canonical JSON the hash was computed over
    (`_row`). So any other text breaks the link, even one that decodes to the same values: a
    key given twice (SQLite's `json_extract`, which the audit filters use, reads the first, and
    Python's decoder the last), a space, or text that is not JSON at all (then named as the
    broken position, not raised)."""
    return chained_hash(prev_hash, row, row["data"], row["metadata"],
                        as_utc(row["recorded_at"]).isoformat(timespec="microseconds"))


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
    async def read_stream(self, stream_id: str, after_version: int = 0
                          ) -> list[RecordedEvent]: ...


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


class Reads:
    """Reads on one connection (`EventStore.reading`)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    def scan(self, after: int = 0, where: EventFilter = EVERYTHING,
             page: int = SCAN_PAGE) -> AsyncIterator[list[RawEvent]]:
        return _scan(self._conn, after, where, page)


# Built once: a stream's read is the commonest statement, and building it per call (column
# operators, coercions) cost about a tenth of a read route's CPU; only its parameters change.
_STREAM = events.select().where(
    events.c.stream_id == sa.bindparam("stream_id"),
    events.c.stream_version > sa.bindparam("after_version")).order_by(events.c.stream_version)


# Several whole streams in one statement (one round trip, one snapshot), in stream order.
_STREAMS = events.select().where(
    events.c.stream_id.in_(sa.bindparam("stream_ids", expanding=True))).order_by(
    events.c.stream_id, events.c.stream_version)


def _stream_params(stream_id: str, after_version: int) -> dict[str, Any]:
    return {"stream_id": stream_id, "after_version": after_version}


def _after(after: int | sa.ColumnElement[int], limit: int | sa.BindParameter[int] | None,
           where: EventFilter = EVERYTHING) -> sa.Select[Any]:
    q = events.select().where(events.c.position > after, *where.clauses()).order_by(
        events.c.position)
    return q if limit is None else q.limit(limit)


# What a relay publishes next (built once: it runs on every commit's wake-up): the events after
# its checkpoint, the checkpoint read inside the same statement.
_PENDING = _after(sa.func.coalesce(sa.select(checkpoints.c.position).where(
    checkpoints.c.name == sa.bindparam("checkpoint")).scalar_subquery(), 0),
    sa.bindparam("limit", type_=sa.Integer))
_PENDING_AFTER = _after(sa.bindparam("after", type_=sa.Integer),
                        sa.bindparam("limit", type_=sa.Integer))


_encode_str = json.encoder.encode_basestring  # the string encoder `canonical_json` uses (C)


def _json(value: Any) -> str:
    """`canonical_json(value)`, the common scalars without the encoder's set-up."""
    if type(value) is str:
        return _encode_str(value)
    if type(value) is int:
        return int.__repr__(value)
    return canonical_json(value)


def chained_hash(prev_hash: str, row: dict[str, Any], data: str, metadata: str,
                 recorded_at: str) -> str:
    """`event_hash(prev_hash, row)` from the row's data and metadata already in canonical JSON
    and its `recorded_at` already in ISO form: the same text, key for key in sorted order, so the
    same hash (pinned by a property test), without encoding the data twice (the column holds
    the same text) nor the timestamp once a row (a group commit shares one)."""
    content = "".join((
        '{"data":', data, ',"event_id":', _json(row["event_id"]), ',"metadata":', metadata,
        ',"position":', _json(row["position"]), ',"recorded_at":', _json(recorded_at),
        ',"schema_version":', _json(row["schema_version"]), ',"stream_id":',
        _json(row["stream_id"]), ',"stream_version":', _json(row["stream_version"]),
        ',"type":', _json(row["type"]), "}"))
    return hashlib.sha256((prev_hash + content).encode()).hexdigest()


def _row(position: int, stream_id: str, version: int, new: NewEvent, now: datetime,
         stamp: tuple[str, Any], prev_hash: str) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """The stored event, and its values as the database takes them (`_COLUMNS`' order): the
    data and metadata as the canonical JSON text the hash was computed over; the time as
    `stamp` gives it (its ISO form for the hash, and the driver's value)."""
    row: dict[str, Any] = {
        "position": position, "stream_id": stream_id, "stream_version": version,
        "event_id": new.event_id, "type": new.type, "schema_version": new.schema_version,
        "data": new.data, "metadata": new.metadata, "recorded_at": now, "prev_hash": prev_hash,
    }
    data, metadata = canonical_json(new.data), canonical_json(new.metadata)
    row["hash"] = chained_hash(prev_hash, row, data, metadata, stamp[0])
    return row, (position, stream_id, version, new.event_id, new.type, new.schema_version,
                 data, metadata, stamp[1], prev_hash, row["hash"])


# What a group commit reads first, once it holds the write lock, in one statement: the head's
# position and hash (a row whose stream is NULL, none when the store is empty), then each stream's
# version (NULL: no events yet), one step down the (stream_id, stream_version) index per stream
# (a `max() ... GROUP BY` would read every event of every stream). The rows PostgreSQL's
# `event_store_lock` gives (0004), so both are read by `_head_and_versions`.
_SQLITE_HEAD_AND_VERSIONS = sa.text(
    "SELECT NULL, NULL, h.position, h.hash FROM (SELECT position, hash FROM events "
    "ORDER BY position DESC LIMIT 1) AS h "
    "UNION ALL "
    "SELECT j.value, (SELECT e.stream_version FROM events e WHERE e.stream_id = j.value "
    "ORDER BY e.stream_version DESC LIMIT 1), NULL, NULL FROM json_each(:streams) AS j")
# `Transaction.prefetch`: which of some event ids are stored, and which a consumer has processed.
_STORED, _MARKED = 1, 2
_PREFETCH = sa.union_all(
    sa.select(sa.literal_column(str(_STORED)), events.c.event_id)
    .where(events.c.event_id.in_(sa.bindparam("ids", expanding=True))),
    sa.select(sa.literal_column(str(_MARKED)), processed_events.c.event_id)
    .where(processed_events.c.consumer == sa.bindparam("consumer"),
           processed_events.c.event_id.in_(sa.bindparam("ids", expanding=True))))
_COPY_FROM = 32  # rows from which a batch is written by COPY rather than INSERT
_COLUMNS = ("position", "stream_id", "stream_version", "event_id", "type", "schema_version",
            "data", "metadata", "recorded_at", "prev_hash", "hash")
_LOCK = sa.text("SELECT * FROM event_store_lock(CAST(:streams AS text[]))")
_INSERT = (
    "INSERT INTO events (position, stream_id, stream_version, event_id, type, schema_version, "
    "data, metadata, recorded_at, prev_hash, hash) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7::json, $8::json, $9, $10, $11)")


_INSERT_SQLITE = (f"INSERT INTO events ({', '.join(_COLUMNS)}) "
                  f"VALUES ({', '.join('?' for _ in _COLUMNS)})")
_MARK_COLUMNS = ("consumer", "event_id", "topic", "processed_at")
_MARK_SQLITE = (f"INSERT INTO processed_events ({', '.join(_MARK_COLUMNS)}) VALUES (?, ?, ?, ?)")
_MARK = (f"INSERT INTO processed_events ({', '.join(_MARK_COLUMNS)}) VALUES ($1, $2, $3, $4)")
# A checkpoint only moves forward; one it has not met yet is made. Every checkpoint a group
# commit moves (a relay's and its partitions' offsets: two to four a batch) goes in one
# statement, one round trip or thread hop, where an UPDATE each (and a look and an INSERT for
# a new one) cost one to three apiece.
_MOVE_CHECKPOINT_SQLITE = (
    "INSERT INTO relay_checkpoints (name, position, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET position = excluded.position, "
    "updated_at = excluded.updated_at WHERE excluded.position > relay_checkpoints.position")
_MOVE_CHECKPOINT = _MOVE_CHECKPOINT_SQLITE.replace("(?, ?, ?)", "($1, $2, $3)")


def _stamp(dialect: sa.Dialect, now: datetime) -> tuple[str, Any]:
    """A group commit's one time: its ISO form (what the hash covers) and the value the driver
    takes (on SQLite, the text SQLAlchemy's DateTime stores, so reads through it are unchanged)."""
    bind = None if dialect.name != "sqlite" else events.c.recorded_at.type.dialect_impl(
        dialect).bind_processor(dialect)
    return as_utc(now).isoformat(timespec="microseconds"), bind(now) if bind else now


async def _head_and_versions(conn: AsyncConnection, sqlite: bool, streams: set[str]
                             ) -> tuple[int, str, dict[str, int]]:
    """The store's head (position and hash) and each stream's version (absent: no events), in
    one round trip once the write lock is held: on PostgreSQL the advisory lock comes with them
    (0004; through SQLAlchemy, which opens the transaction the lock lives in); on SQLite the lock
    was taken by BEGIN IMMEDIATE."""
    rows = await (conn.execute(_SQLITE_HEAD_AND_VERSIONS, {"streams": json.dumps(sorted(streams))})
                  if sqlite else conn.execute(_LOCK, {"streams": sorted(streams)}))
    head, prev_hash, versions = 0, GENESIS_HASH, {}
    for stream, version, position, hash_ in rows:
        if stream is None:
            head, prev_hash = int(position), str(hash_)
        elif version is not None:
            versions[str(stream)] = int(version)
    return head, prev_hash, versions


def _conflict(tx: Transaction, versions: dict[str, int], head: int) -> ConcurrencyError | None:
    """What `tx` read that has moved, or None. `versions` and `head` include the batch's
    transactions before it, so two in one batch are checked as if committed one after the
    other."""
    for stream, read in tx.read_versions.items():
        if versions.get(stream, 0) != read:
            return ConcurrencyError(stream, read, versions.get(stream, 0))
    if tx.read_head is not None and head != tx.read_head:
        return ConcurrencyError("*", tx.read_head, head)
    staged: dict[str, int] = {}
    for a in tx.appends:
        current = versions.get(a.stream_id, 0) + staged.get(a.stream_id, 0)
        if a.expected_version is not None and a.expected_version != current:
            return ConcurrencyError(a.stream_id, a.expected_version, current)
        staged[a.stream_id] = staged.get(a.stream_id, 0) + len(a.events)
    return None


def _unmet(tx: Transaction, passed: set[int]) -> ConcurrencyError | None:
    """A conflict when a transaction whose staged state `tx` read (D59) has not committed before
    it: neither in an earlier group commit nor earlier in this one."""
    for required in tx.requires:
        if required.state != "committed" and id(required) not in passed:
            return ConcurrencyError("*", None, -1)
    return None


def _disconnected(exc: BaseException) -> bool:
    """The database (or the way to it) failed, not the write: SQLAlchemy's connection errors,
    and asyncpg's own, which the raw `executemany` and COPY raise unwrapped."""
    return isinstance(exc, (*_DISCONNECTS, *_ASYNCPG_DISCONNECTS))


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached now (down, restarting, refusing
    connections, a connection it dropped), as opposed to a write it refused or a bug."""
    if _disconnected(exc) or (isinstance(exc, sa.exc.DBAPIError)
                              and bool(exc.connection_invalidated)):
        return True
    # A connection refused while PostgreSQL shuts down or starts (SQLSTATE 57P03) comes as a
    # plain DBAPIError: the asyncpg error is its `orig`'s cause (docs/faults.md, defect 3).
    seen: BaseException | None = getattr(exc, "orig", None) or exc.__cause__
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, _ASYNCPG_DISCONNECTS):
            return True
        seen = seen.__cause__ or getattr(seen, "orig", None)
    return False


def _as_conflict(tx: Transaction, exc: Exception) -> Exception:
    """A unique key the database refused (an event id, a processed mark, a stream version
    written by a process outside the store): the transaction's premise was wrong, run it again.
    (asyncpg's own errors, from the raw `executemany`, carry the SQLSTATE: class 23.)"""
    if isinstance(exc, IntegrityError) or str(getattr(exc, "sqlstate", "")).startswith("23"):
        stream = tx.appends[0].stream_id if tx.appends else "*"
        error = ConcurrencyError(stream, None, -1)
        error.__cause__ = exc
        return error
    return exc


class StagedRead(RuntimeError):
    """A read that would not see what this transaction has staged: a stream it appended to, or
    any read across streams (or of a checkpoint) after an earlier record of a shared
    transaction staged writes (`Transaction.savepoint`). The reader must run in a transaction of
    its own, after this one commits (D78)."""


@dataclass(frozen=True)
class Savepoint:
    """What a transaction had staged and read before one record of a shared transaction
    (`Transaction.savepoint`), to take that record's part back (`Transaction.rollback`)."""

    appends: int
    processed: int
    requires: int
    checkpoints: dict[str, int]
    read_versions: dict[str, int]
    read_head: int | None
    release_when_queued: bool


@dataclass
class _Append:
    stream_id: str
    events: list[NewEvent]
    expected_version: int | None


class Transaction:
    """One unit of work: reads now, writes at commit, all or nothing (D39).

    Reads run at once, without any lock, and each remembers what it saw: the version of every
    stream read, and the store's head before a read across streams. Appends, processed marks and
    checkpoints are staged and written when the transaction ends, by the store's group commit,
    which first checks that nothing this transaction read has moved since: if something has, none
    of it is written and `ConcurrencyError` says to run the command again on fresh reads. So a
    command commits only what it decided on the state that is current at its commit, exactly as if
    it had held a store-wide lock from its first read, without holding one.
    """

    def __init__(self, store: EventStore, held: AsyncExitStack) -> None:
        self.store = store
        self._held = held
        self._conn: AsyncConnection | None = None
        self.read_versions: dict[str, int] = {}
        self.read_head: int | None = None  # the head before the first read across streams
        self.appends: list[_Append] = []
        self.processed: list[dict[str, Any]] = []
        self.checkpoints: dict[str, int] = {}
        self.hooks: tuple[BeforeCommit, ...] = ()
        self.appended: list[RecordedEvent] = []  # filled at commit
        self._exclusive = AsyncExitStack()
        self._keys: set[str] = set()
        self._stored: dict[str, bool] = {}  # event id: stored, as `prefetch` found it
        self._marked: dict[tuple[str, str], bool] = {}  # (consumer, event id): marked processed
        self._staged_ids: set[str] = set()  # the event ids of `appends`
        self._staged_marks: set[tuple[str, str]] = set()  # (consumer, event id) of `processed`
        # Pipelining (D59): transactions whose staged state this one read instead of the
        # database's; it commits only after each of them has, or fails with them.
        self.requires: list[Transaction] = []
        self.state = "open"  # then "committed" or "failed": the committer's word, or on leaving
        self.settled: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._release_when_queued = False  # `exclusive(..., until="queued")`
        self.queued = False  # handed to the group commit
        self._earlier: Savepoint | None = None  # the last savepoint: earlier records' staging

    def savepoint(self) -> Savepoint:
        """Mark the start of the next record's work in a transaction that several consumed
        records share (D78). From here on a read that the earlier records' staged writes could
        have changed raises `StagedRead` (their appends to the stream read; for a read across
        streams or of a checkpoint, any of their appends or checkpoints), since it would not see
        them: the record then goes to the next transaction, after `rollback`."""
        mark = Savepoint(len(self.appends), len(self.processed), len(self.requires),
                         dict(self.checkpoints), dict(self.read_versions), self.read_head,
                         self._release_when_queued)
        self._earlier = mark
        return mark

    def rollback(self, mark: Savepoint) -> None:
        """Forget what was staged and read since `mark` (nothing of it was written: writes are
        staged until the commit). The locks taken since are held to the end, harmlessly."""
        del self.appends[mark.appends:], self.processed[mark.processed:]
        del self.requires[mark.requires:]
        self.checkpoints, self.read_versions = dict(mark.checkpoints), dict(mark.read_versions)
        self.read_head, self._release_when_queued = mark.read_head, mark.release_when_queued
        self._staged_ids = {new.event_id for a in self.appends for new in a.events}
        self._staged_marks = {(m["consumer"], m["event_id"]) for m in self.processed}

    def _across_streams(self, what: str) -> None:
        """A read of the whole store (or of a checkpoint): it sees none of the earlier records'
        staged writes, so it may not follow them."""
        mark = self._earlier
        if mark is not None and (mark.appends or mark.checkpoints):
            raise StagedRead(f"{what} after an earlier record of this transaction staged writes")

    async def conn(self) -> AsyncConnection:
        """The connection this transaction reads on (opened at its first read: an append that
        reads nothing needs none); every write goes through the staging below."""
        if self._conn is None:
            self._conn = await self._held.enter_async_context(self.store.read_engine.connect())
        return self._conn

    async def _read(self, q: sa.Executable,
                    params: dict[str, Any] | None = None) -> sa.CursorResult[Any]:
        return await (await self.conn()).execute(q, params)

    async def close_reads(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    def _staged(self, stream_id: str) -> int:
        return sum(len(a.events) for a in self.appends if a.stream_id == stream_id)

    def _unstaged(self, stream_id: str) -> None:
        """Before a stream's read: one this transaction appended to cannot be read (its staged
        events are not in the database yet), and saying so before the query saves it."""
        if self._staged(stream_id):
            raise StagedRead(f"stream {stream_id!r} read after this transaction appended to it")

    def _saw(self, stream_id: str, version: int) -> None:
        self.read_versions.setdefault(stream_id, version)

    async def stream_version(self, stream_id: str) -> int:
        self._unstaged(stream_id)
        q = sa.select(sa.func.coalesce(sa.func.max(events.c.stream_version), 0)).where(
            events.c.stream_id == stream_id)
        version = int((await self._read(q)).scalar_one())
        self._saw(stream_id, version)
        return version

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        """The stream's events after `after_version` (a snapshot's, see `shared.commands`)."""
        self._unstaged(stream_id)
        found = [_to_recorded(r) for r in await self._read(_STREAM,
                                                            _stream_params(stream_id, after_version))]
        self._saw(stream_id, found[-1].stream_version if found else after_version)
        return found

    async def read_streams(self, after: Mapping[str, int]) -> dict[str, list[RecordedEvent]]:
        """`read_stream` of each stream in `after` (after its version), in one statement: one
        round trip instead of one a stream, for a command that holds a hot lock while it reads
        (the randomization's allocation, D81). Each stream is checked at commit as one read."""
        for stream_id in after:
            self._unstaged(stream_id)
        found: dict[str, list[RecordedEvent]] = {stream_id: [] for stream_id in after}
        if after:
            q = events.select().where(sa.or_(*(
                sa.and_(events.c.stream_id == stream_id, events.c.stream_version > version)
                for stream_id, version in after.items()))).order_by(
                events.c.stream_id, events.c.stream_version)
            for row in await self._read(q):
                found[row.stream_id].append(_to_recorded(row))
        for stream_id, version in after.items():
            self._saw(stream_id, found[stream_id][-1].stream_version if found[stream_id]
                      else version)
        return found

    async def read_all(self, after: int = 0, limit: int | None = None,
                       where: EventFilter = EVERYTHING) -> list[RecordedEvent]:
        """Events after position `after`, in position order. The commit then checks that the
        store's head has not moved since just before this read: whatever it could have missed."""
        await self._note_head()
        return [_to_recorded(r) for r in await self._read(_after(after, limit, where))]

    async def _note_head(self, staged_folded: bool = False) -> None:
        if not staged_folded:
            self._across_streams("a read across streams")
        if self.read_head is None:
            head = sa.select(sa.func.coalesce(sa.func.max(events.c.position), 0))
            self.read_head = int((await self._read(head)).scalar_one())

    async def scan(self, after: int = 0, where: EventFilter = EVERYTHING,
                   page: int = SCAN_PAGE, *, staged_folded: bool = False
                   ) -> AsyncIterator[list[RawEvent]]:
        """`read_all` to the end in pages of undecoded rows (memory flat in the store's size),
        checked at commit like `read_all`: the head is taken before the first page.

        `staged_folded`: the reader folds this transaction's staged events (`staged`) onto the
        pages itself, as the store will append them, so the earlier records of a shared
        transaction do not make this read stale and it need not start a transaction of its own
        (D80). Without it such a read raises `StagedRead` (D78)."""
        await self._note_head(staged_folded)
        async for rows in _scan(await self.conn(), after, where, page):
            yield rows

    def staged(self) -> list[NewEvent]:
        """The events this transaction has staged, in the order the commit will append them
        (after every event in the store: their positions come at commit)."""
        return [new for a in self.appends for new in a.events]

    async def has_event(self, event_id: str) -> bool:
        """Stored or staged. (Two writers of one id: the database's unique key stops the second,
        whose transaction then runs again and finds it.)"""
        if event_id in self._staged_ids:
            return True
        if event_id in self._stored:
            return self._stored[event_id]
        q = sa.select(sa.literal(1)).where(events.c.event_id == event_id)
        return (await self._read(q)).first() is not None

    async def append(self, stream_id: str, new_events: Sequence[NewEvent],
                     expected_version: int | None) -> None:
        """Stage an append at `expected_version` (the events already in the stream; None: after
        whatever is there at commit). Positions and hashes are given at commit, in `appended`."""
        if new_events:
            self.appends.append(_Append(stream_id, list(new_events), expected_version))
            self._staged_ids.update(new.event_id for new in new_events)

    async def was_processed(self, consumer: str, event_id: str) -> bool:
        """Marked in the store, or staged in this transaction."""
        if (consumer, event_id) in self._staged_marks:
            return True
        if (consumer, event_id) in self._marked:
            return self._marked[consumer, event_id]
        q = sa.select(sa.literal(1)).where(
            processed_events.c.consumer == consumer, processed_events.c.event_id == event_id)
        return (await self._read(q)).first() is not None

    async def prefetch(self, consumer: str, event_ids: Sequence[str]) -> None:
        """Find out at once which of these ids are stored and which `consumer` has processed:
        `has_event` and `was_processed` then answer from that (a batch of records sharing one
        transaction asks once, not twice a record; one statement, one round trip). Should
        another writer store one of them before this commits, the unique keys refuse the commit
        and the batch runs again."""
        wanted = list(dict.fromkeys(event_ids))
        stored: set[str] = set()
        marked: set[str] = set()
        for row in await self._read(_PREFETCH, {"ids": wanted, "consumer": consumer}):
            kind, event_id = cast(tuple[int, str], tuple(row))
            (stored if kind == _STORED else marked).add(event_id)
        for event_id in wanted:
            self._stored[event_id] = event_id in stored
            self._marked[consumer, event_id] = event_id in marked

    async def mark_processed(self, consumer: str, event_id: str, topic: str) -> None:
        self.processed.append({"consumer": consumer, "event_id": event_id, "topic": topic})
        self._staged_marks.add((consumer, event_id))

    async def checkpoint(self, name: str) -> int:
        self._across_streams(f"checkpoint {name!r} read")
        q = sa.select(checkpoints.c.position).where(checkpoints.c.name == name)
        return int((await self._read(q)).scalar_one_or_none() or 0)

    async def save_checkpoint(self, name: str, position: int) -> None:
        """Move the checkpoint forward at commit (never back, should two relays race)."""
        self.checkpoints[name] = max(position, self.checkpoints.get(name, 0))

    async def exclusive(self, key: str, until: Literal["committed", "queued"] = "committed"
                        ) -> None:
        """Hold this process's lock named `key` until the transaction has committed or failed:
        commands on one hot aggregate (the allocation, safety's whole-store state) then queue in
        Python instead of losing the race at commit and running again. Replicas in other
        processes still meet at the commit's checks.

        `until="queued"` lets the lock go once the transaction is queued for the group commit
        (D59): the next holder decides on the state this one staged (`Snapshot.stage`), so
        queued commands commit together instead of one commit each. It must then require this
        transaction (`requires`), so that it fails if this one does."""
        if until == "queued":
            self._release_when_queued = True
        if key not in self._keys:
            self._keys.add(key)
            await self._exclusive.enter_async_context(self.store.keyed_lock(key))

    def writes(self) -> bool:
        return bool(self.appends or self.processed or self.checkpoints)

    def settle(self, committed: bool) -> None:
        """Its outcome, once: committed (what it staged is in the database) or failed."""
        if self.state == "open":
            self.state = "committed" if committed else "failed"
            self.settled.set_result(committed)

    async def requirements_met(self) -> bool:
        """Whether every transaction whose staged state this one read has committed."""
        for required in self.requires:
            if not await asyncio.shield(required.settled):
                return False
        return True


# Work that must commit together with whatever the current request appends, in the same
# transaction: set for one request (the idempotency key's "written" mark, D25), empty elsewhere.
BeforeCommit = Callable[[AsyncConnection], Awaitable[None]]
before_commit: ContextVar[tuple[BeforeCommit, ...]] = ContextVar("before_commit", default=())


class Written:
    """The last position the current request's transactions appended (0: none yet): its answer
    waits until the relay has published that far (D56)."""

    __slots__ = ("position",)

    def __init__(self) -> None:
        self.position = 0


written: ContextVar[Written | None] = ContextVar("written", default=None)

_BATCH = 256  # transactions per group commit at most
Outcome = asyncio.Future[BaseException | None]  # a queued transaction's error, None: committed
_DISCONNECTS = (sa.exc.OperationalError, sa.exc.InterfaceError, OSError, TimeoutError)
_ASYNCPG_DISCONNECTS = (asyncpg.exceptions.InterfaceError,  # the connection is closed, ...
                        asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08
                        asyncpg.exceptions.OperatorInterventionError)  # 57: shutting down
# What a request may meet while the database is down or restarting (issue 15): the classes an
# app answers as 503 with Retry-After when `database_unavailable` says so, never as a 500.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    *_DISCONNECTS, *_ASYNCPG_DISCONNECTS, sa.exc.DBAPIError)


class EventStore:
    """A service's event store: reads anywhere, every write through one group commit (D39).

    Transactions read without a lock and stage their writes; `_commit` writes the staged work of
    every transaction waiting at that moment in one database transaction, under one lock held
    only for that write: `pg_advisory_xact_lock` on PostgreSQL, `BEGIN IMMEDIATE` on SQLite, so
    across processes and replicas too. Positions are `head + 1` under that lock, so they are
    gapless and in commit order, and a relay reading `position > checkpoint` can never skip an
    event that commits late (D1).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite = is_sqlite(url)
        self.engine: AsyncEngine = create_engine(url, immediate=True)
        # SQLite readers must not take the write lock; PostgreSQL shares one pool.
        self.read_engine: AsyncEngine = (
            create_engine(url, immediate=False) if self.sqlite else self.engine)
        self._queue: list[tuple[Transaction, Outcome]] = []
        self._committer: asyncio.Task[None] | None = None  # the one writer task (per loop)
        self._idle: asyncio.Future[None] | None = None
        self._closing = False
        self._keyed: dict[str, asyncio.Lock] = {}
        self._committed = asyncio.Event()
        self.group_commits = 0  # database transactions the committer has run (D39)
        self.in_flight = 0  # transactions handed to the committer, waiting for their outcome

    async def close(self) -> None:
        """Commit what is queued, stop the committer, close the connections."""
        task, self._closing = self._committer, True
        if task is not None and not task.done():
            if task.get_loop() is asyncio.get_running_loop():
                self._wake_committer()
                await task
            else:  # its loop has ended (a test's): nothing can be queued on it any more
                task.cancel()
        self._closing = False
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()

    def keyed_lock(self, key: str) -> asyncio.Lock:
        return self._keyed.setdefault(key, asyncio.Lock())

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Read, stage, commit on leaving (nothing on an exception). Raises `ConcurrencyError`
        at the end when what it read moved before it could commit: run the command again."""
        async with AsyncExitStack() as held:
            tx = Transaction(self, held)
            held.push_async_exit(tx._exclusive)
            try:
                try:
                    yield tx
                except Exception as exc:  # a refusal decided on staged state stands only if
                    if not await tx.requirements_met():  # that state committed (D59)
                        raise ConcurrencyError("*", None, -1) from exc
                    raise
                await tx.close_reads()  # give the connection back before waiting for the commit
                if tx.writes():
                    if tx.appends:
                        tx.hooks = before_commit.get()
                    await self._commit(tx)
                    if tx.appended and (mark := written.get()) is not None:
                        mark.position = max(mark.position, tx.appended[-1].position)
                elif not await tx.requirements_met():  # read staged state, wrote nothing
                    raise ConcurrencyError("*", None, -1)
                tx.settle(True)
            finally:
                if not tx.queued:  # left before its commit (a queued one the committer settles)
                    tx.settle(False)

    async def append(self, stream_id: str, new_events: Sequence[NewEvent],
                     expected_version: int | None) -> list[RecordedEvent]:
        async with self.transaction() as tx:
            await tx.append(stream_id, new_events, expected_version)
        return tx.appended

    async def save_checkpoint(self, name: str, position: int) -> None:
        async with self.transaction() as tx:
            await tx.save_checkpoint(name, position)

    async def _commit(self, tx: Transaction) -> None:
        """Queue the transaction for the committer and wait for its outcome. Once queued it
        commits or fails as a whole even if its caller goes away (shielded)."""
        outcome: Outcome = asyncio.get_running_loop().create_future()
        self._queue.append((tx, outcome))
        tx.queued = True
        self._wake_committer()
        self.in_flight += 1
        queued = time.perf_counter()
        try:
            if tx._release_when_queued:
                await tx._exclusive.aclose()
            error = await asyncio.shield(outcome)
        finally:
            self.in_flight -= 1
            timed("commit", time.perf_counter() - queued)  # a request's Server-Timing (D90)
        if error is not None:
            raise error

    def _wake_committer(self) -> None:
        loop = asyncio.get_running_loop()
        if (self._committer is None or self._committer.done()
                or self._committer.get_loop() is not loop) and not self._closing:
            self._committer = loop.create_task(self._commit_forever(), name="group-commit")
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def _commit_forever(self) -> None:
        """Group commit: every transaction queued while the last write ran goes in the next."""
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._idle = asyncio.get_running_loop().create_future()
                await self._idle
                await asyncio.sleep(0)  # let the other writers that are ready queue theirs too
                continue
            batch, self._queue = self._queue[:_BATCH], self._queue[_BATCH:]
            await self._commit_batch(batch)

    async def _commit_batch(self, batch: list[tuple[Transaction, Outcome]]) -> None:
        try:
            failed = await self._write([tx for tx, _ in batch])
        except Exception as exc:
            if _disconnected(exc):
                # The database went away: every caller's error, one they wait out and retry (a
                # raw asyncpg error from executemany or COPY gets SQLAlchemy's class for it).
                error = exc if isinstance(exc, _DISCONNECTS) else sa.exc.OperationalError(
                    "group commit", None, exc)
                for tx, outcome in batch:
                    outcome.set_result(error)
                    tx.settle(False)
            elif len(batch) == 1:
                batch[0][1].set_result(_as_conflict(batch[0][0], exc))
                batch[0][0].settle(False)
            else:  # one transaction's bad write must not fail the others: each alone now
                for one in batch:
                    await self._commit_batch([one])
            return
        for tx, outcome in batch:
            outcome.set_result(failed.get(id(tx)))
            tx.settle(id(tx) not in failed)
        # Only a commit with events has anything to publish: a consumer's processed marks, a
        # relay's own checkpoint or an idempotency mark alone woke the relay for a pass that
        # found nothing (two after every batch it published: its checkpoint, then D84).
        if any(tx.appended for tx, _ in batch):
            self._committed.set()

    async def _write(self, batch: list[Transaction]) -> dict[int, ConcurrencyError]:
        """One database transaction for the batch; returns the transactions refused for reading
        what moved (their work is left out, the rest commits)."""
        failed: dict[int, ConcurrencyError] = {}
        appended: dict[int, list[RecordedEvent]] = {}
        async with self.engine.begin() as conn:
            streams = ({s for tx in batch for s in tx.read_versions}
                       | {a.stream_id for tx in batch for a in tx.appends})
            head, prev_hash, versions = await _head_and_versions(conn, self.sqlite, streams)
            raw = None if self.sqlite else (await conn.get_raw_connection()).driver_connection
            rows: list[tuple[Any, ...]] = []  # as the database takes them (`_row`)
            now = utcnow()
            stamp = _stamp(conn.dialect, now)
            passed: set[int] = set()
            for tx in batch:
                conflict = _unmet(tx, passed) or _conflict(tx, versions, head)
                if conflict is not None:
                    failed[id(tx)] = conflict
                    continue
                passed.add(id(tx))
                for staged in tx.appends:
                    version = versions.get(staged.stream_id, 0)
                    for new in staged.events:
                        head, version = head + 1, version + 1
                        row, values = _row(head, staged.stream_id, version, new, now, stamp,
                                           prev_hash)
                        prev_hash = row["hash"]
                        rows.append(values)
                        appended.setdefault(id(tx), []).append(RecordedEvent(**row))
                    versions[staged.stream_id] = version
            done = [tx for tx in batch if id(tx) not in failed]
            marks = [(m["consumer"], m["event_id"], m["topic"], stamp[1])
                     for tx in done for m in tx.processed]
            # Straight to the driver, the values ready (`_row`): SQLAlchemy's processing of
            # each row's parameters cost more than the insert (docs/benchmarks.md, target 6).
            if len(rows) >= _COPY_FROM and raw is not None:  # many rows: binary COPY
                await raw.copy_records_to_table("events", records=rows, columns=_COLUMNS)
            elif rows and raw is not None:  # asyncpg's executemany: one round trip for all
                await raw.executemany(_INSERT, rows)
            elif rows:
                await conn.exec_driver_sql(_INSERT_SQLITE, rows)
            if marks and raw is not None:
                await raw.executemany(_MARK, marks)
            elif marks:
                await conn.exec_driver_sql(_MARK_SQLITE, marks)
            moves = [(name, position, stamp[1])
                     for tx in done for name, position in tx.checkpoints.items()]
            if moves and raw is not None:
                await raw.executemany(_MOVE_CHECKPOINT, moves)
            elif moves:
                await conn.exec_driver_sql(_MOVE_CHECKPOINT_SQLITE, moves)
            for tx in done:
                for hook in tx.hooks:
                    await hook(conn)
        self.group_commits += 1
        for tx in batch:  # committed
            tx.appended = appended.get(id(tx), [])
        return failed

    async def wait_for_commit(self, timeout: float) -> None:
        """Wake the relay when this process commits; `timeout` covers other writers."""
        try:
            await asyncio.wait_for(self._committed.wait(), timeout)
        except TimeoutError:
            pass
        self._committed.clear()

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        async with self.read_engine.connect() as conn:
            return [_to_recorded(r)
                    for r in await conn.execute(_STREAM, _stream_params(stream_id, after_version))]

    async def read_streams(self, *stream_ids: str) -> dict[str, list[RecordedEvent]]:
        """Each of `stream_ids` whole (empty when it has no events), read in one statement: one
        round trip for a route that folds two streams, and both as of the same moment."""
        found: dict[str, list[RecordedEvent]] = {stream_id: [] for stream_id in stream_ids}
        async with self.read_engine.connect() as conn:
            for row in await conn.execute(_STREAMS, {"stream_ids": list(found)}):
                found[row.stream_id].append(_to_recorded(row))
        return found

    async def read_all(self, after: int = 0, limit: int | None = 1000,
                       where: EventFilter = EVERYTHING) -> list[RecordedEvent]:
        """Events after position `after` that match `where`, in position order."""
        async with self.read_engine.connect() as conn:
            return [_to_recorded(r) for r in await conn.execute(_after(after, limit, where))]

    async def scan(self, after: int = 0, where: EventFilter = EVERYTHING,
                   page: int = SCAN_PAGE) -> AsyncIterator[list[RawEvent]]:
        """Events after `after` matching `where`, to the end, in pages of undecoded rows: each
        page a query of its own by position, so memory stays flat however big the store."""
        async with self.reading() as reads:
            async for rows in reads.scan(after, where, page):
                yield rows

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[Reads]:
        """Several reads on one connection: one checkout from the pool and one round trip less
        each (a patient's history reads two sets of streams), writing nothing."""
        async with self.read_engine.connect() as conn:
            yield Reads(conn)

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
            q = sa.select(checkpoints.c.position).where(checkpoints.c.name == name)
            return int((await conn.execute(q)).scalar_one_or_none() or 0)

    async def pending(self, checkpoint: str, limit: int, after: int | None = None
                      ) -> list[RecordedEvent]:
        """The first `limit` events after the checkpoint `checkpoint` (or after the position
        `after`, when the relay knows it has published that far), in position order: what a
        relay publishes next. One statement (the checkpoint read inside it), where `checkpoint`
        and `read_all` would take a connection and a snapshot each, on every commit's wake-up."""
        async with self.read_engine.connect() as conn:
            if after is not None:
                rows = await conn.execute(_PENDING_AFTER, {"after": after, "limit": limit})
            else:
                rows = await conn.execute(_PENDING, {"checkpoint": checkpoint, "limit": limit})
            return [_to_recorded(r) for r in rows]

    async def published_through(self, relay: str) -> int:
        """How far the relay `relay` has published, whichever replica runs it: its furthest
        checkpoint on any broker cluster (`relay@cluster`; not the per-partition offsets kept
        beside them, `...#topic/partition`)."""
        name = checkpoints.c.name
        q = sa.select(sa.func.coalesce(sa.func.max(checkpoints.c.position), 0)).where(
            sa.or_(name == relay, name.startswith(f"{relay}@", autoescape=True)),
            ~name.contains("#", autoescape=True))
        async with self.read_engine.connect() as conn:
            return int((await conn.execute(q)).scalar_one())

    async def verify(self, batch: int = 1000, after: int = 0,
                     after_hash: str = GENESIS_HASH) -> VerifyResult:
        """Walk the chain from the start; name the first position whose row or link is wrong.

        `after` and `after_hash` walk only the rest of a chain whose start was verified before
        (and is witnessed elsewhere): `events_checked` then counts the rows after `after`.
        """
        prev_hash, expected_position, checked, first = after_hash, after + 1, 0, None
        async with self.read_engine.connect() as conn:
            while True:
                q = sa.select(*_AS_STORED).where(events.c.position >= expected_position).order_by(
                    events.c.position).limit(batch)
                rows = [dict(r._mapping) for r in await conn.execute(q)]
                if not rows:
                    return VerifyResult(True, checked, None, first,
                                        prev_hash if checked else None)
                for row in rows:
                    if (row["position"] != expected_position or row["prev_hash"] != prev_hash
                            or _stored_hash(prev_hash, row) != row["hash"]):
                        return VerifyResult(False, checked, expected_position, first)
                    prev_hash, expected_position, checked = row["hash"], expected_position + 1, \
                        checked + 1
                    first = first or row["hash"]
