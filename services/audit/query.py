"""Reading the ledger through the store: the filters, a page, a patient's history, a verification
against the anchors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from json.encoder import encode_basestring_ascii
from typing import Any

from services.audit.domain import AUDIT_SOURCE, entry, history_order, ledger_time, reason_of
from services.audit.history import Fact, History
from shared.events import CATALOGUE, parse_data
from shared.store import SCAN_PAGE, EventFilter, EventStore, RawEvent, as_utc

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


def raw_entry(row: RawEvent) -> dict[str, Any]:
    """`domain.entry` of a row as the store holds it (data and metadata still JSON text)."""
    return entry({**row._asdict(), "data": json.loads(row.data),
                  "metadata": json.loads(row.metadata), "recorded_at": as_utc(row.recorded_at)})


_NO_DATA: dict[str, Any] = {}  # never written to
_compact = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _json(value: Any) -> str:
    """One JSON value, compact (as `json.dumps(..., separators=(",", ":"), default=str)`)."""
    if value.__class__ is str:
        return encode_basestring_ascii(value)
    return "null" if value is None else _compact(value)


def _may_give_reason(data: str) -> bool:
    """Whether the data's JSON text may hold a key `reason_of` reads (`reason`,
    `deviation_reason`, `rationale`). A key spelled with a \\u escape could hide one: text
    with any such escape is decoded too. A false "may" only costs a decode."""
    return 'reason"' in data or 'rationale"' in data or "\\u" in data


def entry_json(row: RawEvent) -> tuple[dict[str, Any], str]:
    """A row's metadata (decoded) and its ledger entry as compact JSON text: the same object,
    fields in the same order, as `raw_entry(row)` (and as `json.dumps` of it would write), built
    without decoding the data. The data's stored JSON text is embedded as it is: it is one JSON
    object, and a line break in it, which JSON allows between tokens but an NDJSON line does
    not, is re-encoded away. The data is decoded only when it may give the entry's reason."""
    meta = json.loads(row.metadata)
    data = row.data
    reason = reason_of(meta, json.loads(data) if _may_give_reason(data) else _NO_DATA)
    if "\n" in data or "\r" in data:
        data = _compact(json.loads(data))
    at = row.recorded_at  # UTC: naive as SQLite returns it, aware from PostgreSQL
    recorded = at.isoformat() + "+00:00" if at.tzinfo is None else as_utc(at).isoformat()
    get = meta.get
    return meta, (
        f'{{"position":{row.position:d},"event_id":{_json(row.event_id)},'
        f'"type":{_json(row.type)},"source":{_json(get("source"))},'
        f'"topic":{_json(get("topic"))},"subject":{_json(get("subject"))},'
        f'"time":{_json(get("time"))},"actor":{{"sub":{_json(get("actor"))},'
        f'"role":{_json(get("role"))},"site":{_json(get("site"))}}},'
        f'"correlation_id":{_json(get("correlation_id"))},'
        f'"causation_id":{_json(get("causation_id"))},"reason":{_json(reason)},'
        f'"recorded_at":"{recorded}","data":{data},"hash":{_json(row.hash)},'
        f'"prev_hash":{_json(row.prev_hash)}}}')


@asynccontextmanager
async def scanning(store: EventStore, where: EventFilter, page: int = SCAN_PAGE
                   ) -> AsyncIterator[AsyncIterator[list[RawEvent]]]:
    """`store.scan`, closed on leaving however the reader left it (an export whose client went
    away), so its connection goes back to the pool at once, not whenever it is collected."""
    pages = store.scan(where=where, page=page)
    try:
        yield pages
    finally:
        close = getattr(pages, "aclose", None)
        if close is not None:
            await close()


async def _all(pages: AsyncIterator[list[RawEvent]]) -> list[RawEvent]:
    return [row async for rows in pages for row in rows]


async def history_rows(store: EventStore, patient_id: str) -> list[RawEvent]:
    """The rows of a patient's history in ledger order (at most `HISTORY_CAP`): the patient's
    stream, and the stream of each screening their enrolment names.

    Every read is by stream, so on the stream index whatever the planner knows; only the
    enrolments' data is decoded, to find their screenings."""
    async with store.reading() as reads:  # both reads on one connection
        own = await _all(reads.scan(where=EventFilter(stream_ids=(patient_id,))))
        screenings = dict.fromkeys(
            s for r in own if r.type == "PatientEnrolled"
            if (s := json.loads(r.data).get("screening_id")))
        screenings.pop(patient_id, None)  # already read
        if not screenings:
            return own[:HISTORY_CAP]
        found = own + await _all(reads.scan(where=EventFilter(stream_ids=tuple(screenings))))
    found.sort(key=lambda r: r.position)
    return found[:HISTORY_CAP]


async def patient_history(store: EventStore, patient_id: str) -> list[dict[str, Any]]:
    """Everything about one patient across services, from the screening that enrolled them on,
    causes before effects."""
    return history_order([raw_entry(r) for r in await history_rows(store, patient_id)])


async def patient_history_json(store: EventStore, patient_id: str) -> list[str]:
    """`patient_history` as the JSON text of each entry, in the same order: what the route
    sends, encoded once (`entry_json`)."""
    light = []
    for row in await history_rows(store, patient_id):
        meta, text = entry_json(row)
        light.append({"event_id": row.event_id, "time": meta.get("time"),
                      "position": row.position, "causation_id": meta.get("causation_id"),
                      "json": text})
    return [e["json"] for e in history_order(light)]


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
                                  source=str(meta.get("source") or AUDIT_SOURCE),
                                  data=parse_data(e.type, e.data)))
        if len(batch) < 1000:
            return History.of_facts(facts)
        after = batch[-1].position
