"""The audit ledger's one handler: every event of every topic, appended once, hash-chained."""

from __future__ import annotations

from shared.consumer import Delivery
from shared.store import NewEvent, Transaction


async def record(tx: Transaction, delivery: Delivery) -> None:
    e = delivery.event
    metadata = {
        "topic": delivery.topic, "source": e.source, "subject": e.subject,
        "time": e.time.isoformat(), "sequence": e.sequence, "actor": e.actor,
        "role": e.actorrole, "site": e.actorsite, "correlation_id": e.correlationid,
        "causation_id": e.causationid, "reason": e.reason,
    }
    entry = NewEvent(type=e.type, data=e.data, event_id=e.id, schema_version=e.schemaversion,
                     metadata={k: v for k, v in metadata.items() if v is not None})
    # The ledger keeps the source's order per subject; its own position orders it overall.
    await tx.append(e.subject, [entry], None)
