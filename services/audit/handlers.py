"""The audit ledger's one handler: every event of every topic, appended once, hash-chained."""

from __future__ import annotations

from datetime import UTC
from typing import Any

import sqlalchemy as sa

from shared.consumer import Delivery
from shared.schema import events
from shared.store import NewEvent, Transaction


def ledger_stream(subject: str, data: dict[str, Any]) -> str:
    """The ledger files an event under its patient when it names one, else under its subject.

    So "everything about patient P" is one indexed stream, even for events keyed by something
    else (an infusion id, a hold's target, a refused request's id).
    """
    patient = data.get("patient_id")
    return patient if isinstance(patient, str) and patient else subject


def ledger_time(event_time: Any) -> str:
    # One fixed format (UTC, microseconds), so that time filters compare correctly as text.
    return str(event_time.astimezone(UTC).isoformat(timespec="microseconds"))


async def record(tx: Transaction, delivery: Delivery) -> None:
    e = delivery.event
    metadata = {
        "topic": delivery.topic, "source": e.source, "subject": e.subject,
        "time": ledger_time(e.time), "sequence": e.sequence, "actor": e.actor,
        "role": e.actorrole, "site": e.actorsite, "correlation_id": e.correlationid,
        "causation_id": e.causationid, "reason": e.reason,
    }
    entry = NewEvent(type=e.type, data=e.data, event_id=e.id, schema_version=e.schemaversion,
                     metadata={k: v for k, v in metadata.items() if v is not None})
    # Belt and braces beside the processed-id check: the ledger holds each event id once.
    if (await tx.conn.execute(sa.select(events.c.position).where(events.c.event_id == e.id))
            ).first() is not None:
        return
    # Position is arrival order (docs/decisions.md, D6 and "Audit: the ledger files by patient").
    await tx.append(ledger_stream(e.subject, e.data), [entry], None)
