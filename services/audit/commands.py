"""The audit ledger's one command: every event of every topic, appended once, hash-chained."""

from __future__ import annotations

from services.audit.domain import ledger_stream, ledger_time
from shared.consumer import Delivery, batchable
from shared.store import NewEvent, Transaction


@batchable  # reads nothing but `has_event`, which sees the batch's staged entries
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
    if await tx.has_event(e.id):
        return
    # Position is arrival order (docs/decisions.md, D6 and "Audit: the ledger files by patient").
    await tx.append(ledger_stream(e.subject, e.data), [entry], None)
