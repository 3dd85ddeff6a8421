"""Reading the ledger through the store: the filters, a page, a patient's history, a verification
against the anchors."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.audit.domain import entry, history_order, ledger_time
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
