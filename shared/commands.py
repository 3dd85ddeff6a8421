"""The command layer's one pattern, written once: load (fold) -> decide (pure) -> append, in one
store transaction that commits only if nothing it read has moved, run again when something has."""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Generic, ParamSpec, TypeVar

from shared.decider import Decider, Identified
from shared.errors import ConcurrencyError
from shared.events import EventData
from shared.retry import on_conflict_again
from shared.store import EventStore, Metadata, NewEvent, RecordedEvent, Transaction

S = TypeVar("S")

Decided = EventData | Identified[EventData]


class Session:
    """One command's transaction: the streams it read, at which version, and what it appends."""

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx
        self.versions: dict[str, int] = {}
        self._read: dict[tuple[str, int], list[RecordedEvent]] = {}  # (stream, after version)

    async def read_ahead(self, after: Mapping[str, int]) -> None:
        """Read the streams in `after` (each after its version) in one statement; the loads
        that follow take their events from it instead of a statement each (D81)."""
        found = await self.tx.read_streams(after)
        self._read.update({(stream, after[stream]): events for stream, events in found.items()})

    async def read_stream(self, stream: str, after_version: int = 0) -> list[RecordedEvent]:
        """The stream's events after `after_version`: as read ahead at that version, else read.
        Read ahead at another version (a staging transaction failed meanwhile), the command runs
        again: its commit would check the stream at the version read ahead."""
        ahead = self._read.pop((stream, after_version), None)
        if ahead is not None:
            return ahead
        for other, version in self._read:
            if other == stream:
                raise ConcurrencyError(stream, after_version, version)
        return await self.tx.read_stream(stream, after_version)

    async def load(self, decider: Decider[S, Any, Any], *streams: str) -> S:
        """Fold the streams' events (one after the other) into the decider's state. Each stream
        is remembered at the version read: appending to it later expects that version."""
        events: list[EventData] = []
        for stream in streams:
            recorded = await self.read_stream(stream)
            self.versions[stream] = len(recorded)
            events += [r.payload() for r in recorded]
        return decider.fold(events)

    async def append(self, stream: str, events: Sequence[Decided], meta: Metadata) -> None:
        """Append at the version this session read (no version check for a stream it never
        read: a new one under a fresh id, or a store-wide projection such as safety's)."""
        if not events:
            return
        expected = self.versions.get(stream)
        await self.tx.append(stream, [_new(e, meta) for e in events], expected)
        if expected is not None:
            self.versions[stream] = expected + len(events)


class Snapshot(Generic[S]):
    """One stream's state, kept folded in this process by version, per store: a load reads only
    the events after it (the randomization's trial-wide allocation, which grows with every
    patient). The stream is append-only, so the state at a version never changes; what the load
    reads it remembers at the version reached, as `Session.load` does."""

    def __init__(self, decider: Decider[S, Any, Any], stream: str) -> None:
        self.decider, self.stream = decider, stream
        self._kept: weakref.WeakKeyDictionary[EventStore, tuple[int, S]] = (
            weakref.WeakKeyDictionary())
        # The state a transaction has staged and not yet committed (D59), per store.
        self._staged: weakref.WeakKeyDictionary[EventStore, tuple[int, S, Transaction]] = (
            weakref.WeakKeyDictionary())

    async def load(self, session: Session, staged: bool = False) -> S:
        """The state at the stream's last version; with `staged`, at the version the last
        `stage` left while its transaction commits: this session then commits only after that
        one has (it fails, and runs again, if that one fails). Only a command holding the
        stream's `exclusive(..., until="queued")` lock may read staged state."""
        store = session.tx.store
        version, state = self._kept.get(store, (0, self.decider.initial))
        pending = self._pending(store, version) if staged else None
        committed = True  # the state is the database's alone: it may be kept
        if pending is not None:
            version, state, staging = pending
            session.tx.requires.append(staging)
            committed = staging.state == "committed"
        newer = await session.read_stream(self.stream, after_version=version)
        if newer:
            state = self.decider.fold((e.payload() for e in newer), state)
            version = newer[-1].stream_version
            # Never keep a fold over staged state: should it fail, every later load would
            # start from a slot that went to nobody (found by the two-replica test on PostgreSQL).
            if committed and version > self._kept.get(store, (0, state))[0]:
                self._kept[store] = (version, state)
        session.versions[self.stream] = version
        return state

    def _pending(self, store: EventStore, kept: int) -> tuple[int, S, Transaction] | None:
        """The staged state a `load(staged=True)` starts from, if any is newer than `kept`."""
        pending = self._staged.get(store)
        if pending is not None and pending[2].state != "failed" and pending[0] > kept:
            return pending
        return None

    def version_to_read(self, session: Session, staged: bool = False) -> int:
        """The version a `load` now would read the stream after (for `Session.read_ahead`). Should
        it differ when the load comes (a staging transaction failed meanwhile), the command runs
        again (`Session.read_stream`)."""
        store = session.tx.store
        version = self._kept.get(store, (0, self.decider.initial))[0]
        pending = self._pending(store, version) if staged else None
        return pending[0] if pending is not None else version

    def stage(self, session: Session, state: S) -> None:
        """`state` is the stream's after this session's appends: the next `load(staged=True)`
        starts from it while this session's transaction commits (D59). Kept once committed,
        forgotten if it fails."""
        store, tx, version = session.tx.store, session.tx, session.versions[self.stream]
        self._staged[store] = (version, state, tx)

        def settled(outcome: asyncio.Future[bool]) -> None:
            if outcome.result() and version > self._kept.get(store, (0, state))[0]:
                self._kept[store] = (version, state)
            if (entry := self._staged.get(store)) is not None and entry[2] is tx:
                del self._staged[store]

        tx.settled.add_done_callback(settled)


def _new(event: Decided, meta: Metadata) -> NewEvent:
    if isinstance(event, Identified):
        return NewEvent.of(event.event, meta, event_id=event.event_id)
    return NewEvent.of(event, meta)


@asynccontextmanager
async def session(store: EventStore) -> AsyncIterator[Session]:
    """A command's transaction: it commits only if every stream it loaded is still at the
    version it read (else `ConcurrencyError`: run the command again, see `retried`)."""
    async with store.transaction() as tx:
        yield Session(tx)


P = ParamSpec("P")
T = TypeVar("T")


def retried(command: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """A command function run again, from its first read, when its commit finds that what it
    read has moved (D39). Commands are pure decisions on what they read, so running one again
    is always safe: nothing of a refused commit was written."""
    @functools.wraps(command)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return await on_conflict_again(lambda: command(*args, **kwargs))

    return run
