"""Reading the ledger: filters as SQL, entries as the contract shows them, a patient's history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from services.audit.handlers import ledger_time
from shared.schema import events


@dataclass(frozen=True)
class Filters:
    patient_id: str | None = None
    type: str | None = None
    source: str | None = None
    actor: str | None = None
    since: datetime | None = None  # inclusive, event time
    until: datetime | None = None  # exclusive, event time
    correlation_id: str | None = None  # everything one request caused, across services

    def where(self) -> list[sa.ColumnElement[bool]]:
        meta = events.c.metadata
        clauses: list[sa.ColumnElement[bool]] = []
        if self.patient_id is not None:  # one indexed stream: see handlers.ledger_stream
            clauses.append(events.c.stream_id == self.patient_id)
        if self.type is not None:
            clauses.append(events.c.type == self.type)
        if self.source is not None:
            clauses.append(meta["source"].as_string() == self.source)
        if self.actor is not None:
            clauses.append(meta["actor"].as_string() == self.actor)
        if self.correlation_id is not None:
            clauses.append(meta["correlation_id"].as_string() == self.correlation_id)
        if self.since is not None:
            clauses.append(meta["time"].as_string() >= ledger_time(_aware(self.since)))
        if self.until is not None:
            clauses.append(meta["time"].as_string() < ledger_time(_aware(self.until)))
        return clauses


def _aware(value: datetime) -> datetime:
    # A time without a zone is read as UTC, the zone everything here is stored in.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def page_query(filters: Filters, after: int, limit: int) -> sa.Select[Any]:
    return (events.select().where(events.c.position > after, *filters.where())
            .order_by(events.c.position).limit(limit))


def reason_of(meta: dict[str, Any], data: dict[str, Any]) -> str | None:
    """Why, when the event corrects or deviates: the envelope's reason, else the data's own."""
    for value in (meta.get("reason"), data.get("deviation_reason"), data.get("reason"),
                  data.get("rationale")):
        if isinstance(value, str) and value:
            return value
    return None


def entry(row: dict[str, Any]) -> dict[str, Any]:
    """One ledger entry: who, what, when, which request, why, and where it sits in the chain."""
    meta, data = row["metadata"], row["data"]
    recorded = row["recorded_at"]
    return {
        "position": row["position"], "event_id": row["event_id"], "type": row["type"],
        "source": meta.get("source"), "topic": meta.get("topic"), "subject": meta.get("subject"),
        "time": meta.get("time"),
        "actor": {"sub": meta.get("actor"), "role": meta.get("role"), "site": meta.get("site")},
        "correlation_id": meta.get("correlation_id"), "causation_id": meta.get("causation_id"),
        "reason": reason_of(meta, data),
        "recorded_at": recorded.isoformat() if isinstance(recorded, datetime) else recorded,
        "data": data, "hash": row["hash"], "prev_hash": row["prev_hash"],
    }


def history_order(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A patient's history in order: by source event time (ledger position breaks ties), and
    never an effect before its cause, whatever the clocks say.

    Ledger position is arrival order, which across topics need not be causal (the dosing
    calendar can arrive before the assignment that caused it); the source time is when the
    owning service committed the event, and the causation id fixes what skew could still swap.
    """
    ordered = sorted(entries, key=lambda e: (str(e["time"]), e["position"]))
    present = {e["event_id"] for e in ordered}
    emitted: set[str] = set()
    waiting: dict[str, list[dict[str, Any]]] = {}
    out: list[dict[str, Any]] = []

    def emit(e: dict[str, Any]) -> None:
        out.append(e)
        emitted.add(e["event_id"])
        for child in waiting.pop(e["event_id"], []):
            emit(child)

    for e in ordered:
        cause = e.get("causation_id")
        if isinstance(cause, str) and cause in present and cause not in emitted:
            waiting.setdefault(cause, []).append(e)
        else:
            emit(e)
    # A cycle cannot happen with real ids; anything left waiting still appears, at the end.
    out.extend(e for children in waiting.values() for e in children)
    return out
