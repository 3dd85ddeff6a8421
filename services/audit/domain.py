"""Pure audit ledger rules: where an entry is filed, its time as text, how an entry reads, and a
patient's history in causal order. No I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

# The source of what the audit service files itself (the reads through it, D50) and publishes
# (its anchors' and those reads' envelopes, D93).
AUDIT_SOURCE = "/services/audit"


def ledger_stream(subject: str, data: dict[str, Any]) -> str:
    """The ledger files an event under its patient when it names one, else under its subject.

    So "everything about patient P" is one indexed stream, even for events keyed by something
    else (an infusion id, a hold's target, a refused request's id).
    """
    patient = data.get("patient_id")
    return patient if isinstance(patient, str) and patient else subject


def ledger_time(event_time: datetime) -> str:
    """One fixed format (UTC, microseconds), so that time filters compare correctly as text.
    A time without a zone is read as UTC, the zone everything here is stored in."""
    aware = event_time.replace(tzinfo=UTC) if event_time.tzinfo is None else event_time
    return aware.astimezone(UTC).isoformat(timespec="microseconds")


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
