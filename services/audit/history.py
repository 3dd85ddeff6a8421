"""The trial's history as the reports read it: the ledger's entries as typed facts, in ledger
order, with the position each report reflects. Pure: the reading is `query.facts`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from shared.events import EventData

E = TypeVar("E", bound=EventData)


@dataclass(frozen=True)
class Fact:
    """One ledger entry: where it sits, its event id and time (UTC), which service wrote it,
    and its data, typed by the event catalogue."""

    position: int
    event_id: str
    time: datetime
    source: str
    data: EventData


@dataclass(frozen=True)
class History:
    """Every fact up to `position` (the ledger position a report reflects)."""

    facts: tuple[Fact, ...]

    @property
    def position(self) -> int:
        return self.facts[-1].position if self.facts else 0

    def of(self, *types: type[E]) -> Iterator[tuple[Fact, E]]:
        """The facts whose data is one of `types`, with the data typed, in ledger order."""
        for fact in self.facts:
            if isinstance(fact.data, types):
                yield fact, fact.data

    def data(self, *types: type[E]) -> list[E]:
        return [d for _, d in self.of(*types)]

    @classmethod
    def of_facts(cls, facts: Iterable[Fact]) -> History:
        return cls(tuple(sorted(facts, key=lambda f: f.position)))
