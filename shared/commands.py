"""The command layer's one pattern, written once: load (fold) -> decide (pure) -> append, in one
store transaction, with each stream appended at the version it was read."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from shared.decider import Decider, Identified
from shared.events import EventData
from shared.store import EventStore, Metadata, NewEvent, RecordedEvent, Transaction

S = TypeVar("S")

Decided = EventData | Identified[EventData]


class Session:
    """One command's transaction: the streams it read, at which version, and what it appends."""

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx
        self.versions: dict[str, int] = {}

    async def load(self, decider: Decider[S, Any, Any], *streams: str) -> S:
        """Fold the streams' events (one after the other) into the decider's state. Each stream
        is remembered at the version read: appending to it later expects that version."""
        events: list[EventData] = []
        for stream in streams:
            recorded = await self.tx.read_stream(stream)
            self.versions[stream] = len(recorded)
            events += [r.payload() for r in recorded]
        return decider.fold(events)

    async def append(self, stream: str, events: Sequence[Decided], meta: Metadata
                     ) -> list[RecordedEvent]:
        """Append at the version this session read (no version check for a stream it never
        read: a new one under a fresh id, or a store-wide projection such as safety's)."""
        if not events:
            return []
        expected = self.versions.get(stream)
        recorded = await self.tx.append(stream, [_new(e, meta) for e in events], expected)
        if expected is not None:
            self.versions[stream] = expected + len(recorded)
        return recorded


def _new(event: Decided, meta: Metadata) -> NewEvent:
    if isinstance(event, Identified):
        return NewEvent.of(event.event, meta, event_id=event.event_id)
    return NewEvent.of(event, meta)


@asynccontextmanager
async def session(store: EventStore) -> AsyncIterator[Session]:
    """A command's transaction under the store's write lock: what it loads cannot move before
    it appends, and the expected versions still guard every stream, should a writer bypass it."""
    async with store.transaction() as tx:
        yield Session(tx)
