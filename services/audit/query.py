"""Reading the ledger through the store: the filters, a page, a patient's history, a verification
against the anchors."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.audit.domain import entry, history_order, ledger_time
from services.audit.history import Fact, History
from shared.events import CATALOGUE, parse_data
from shared.store import EventFilter, EventStore

HISTORY_CAP = 10_000


@dataclass(frozen=True)
class Filters:
    patient_id: str | None = None
    type: str | None = None
    source: str | None = None
    actor: str | None = None
    since: datetime | None = None  # inclusive, event time
    until: datetime | None = None  # exclusive, event time
    correlation_id: str | None = None  # everything one request caused, across services

    def where(self) -> EventFilter:
        """The store's filter: the patient is one indexed stream (`domain.ledger_stream`), the
        rest are the entry's metadata, times compared as fixed-format UTC text."""
        meta = {k: v for k, v in (("source", self.source), ("actor", self.actor),
                                  ("correlation_id", self.correlation_id)) if v is not None}
        since = ledger_time(self.since) if self.since is not None else None
        until = ledger_time(self.until) if self.until is not None else None
        return EventFilter(
            stream_ids=None if self.patient_id is None else (self.patient_id,),
            types=None if self.type is None else (self.type,), metadata=meta,
            metadata_range={"time": (since, until)} if since or until else {})


async def page(store: EventStore, filters: Filters, after: int, limit: int
               ) -> list[dict[str, Any]]:
    """Entries after ledger position `after`, in ledger order (arrival order)."""
    return [entry(vars(e)) for e in await store.read_all(after, limit, filters.where())]


async def patient_history(store: EventStore, patient_id: str) -> list[dict[str, Any]]:
    """Everything about one patient across services, from the screening that enrolled them on,
    causes before effects."""
    enrolled = await store.read_all(where=EventFilter(stream_ids=(patient_id,),
                                                      types=("PatientEnrolled",)), limit=None)
    screenings = [e.data["screening_id"] for e in enrolled if e.data.get("screening_id")]
    found = await store.read_all(where=EventFilter(stream_ids=(patient_id, *screenings)),
                                 limit=HISTORY_CAP)
    return history_order([entry(vars(e)) for e in found])


async def history(store: EventStore, up_to: int | None = None) -> History:
    """The whole ledger as typed facts (a trial's few thousand events), up to a position.
    An entry whose type the catalogue does not know is left out (none is, today)."""
    facts: list[Fact] = []
    after = 0
    while True:
        batch = await store.read_all(after, 1000)
        for e in batch:
            if up_to is not None and e.position > up_to:
                return History.of_facts(facts)
            if e.type in CATALOGUE:
                meta = e.metadata
                # The ledger's own entries (its protocol version) have no envelope: their
                # time is when the ledger recorded them.
                time = meta.get("time")
                facts.append(Fact(position=e.position, event_id=e.event_id,
                                  time=datetime.fromisoformat(time) if time else e.recorded_at,
                                  source=str(meta.get("source") or "/services/audit"),
                                  data=parse_data(e.type, e.data)))
        if len(batch) < 1000:
            return History.of_facts(facts)
        after = batch[-1].position
