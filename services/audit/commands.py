"""The audit ledger's one command: every event of every topic, appended once, hash-chained."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from services.audit.domain import AUDIT_SOURCE, ledger_stream, ledger_time
from shared.auth import Principal
from shared.consumer import Delivery, files_under_event_id
from shared.events import ACCESS, CloudEvent, PatientDataViewed
from shared.store import NewEvent, Transaction
from shared.web import current_request_id


def ledger_entry(delivery: Delivery) -> tuple[str, NewEvent]:
    """The delivery's entry in the ledger, and the stream it is filed under: the event's type,
    data and id as published, its envelope's facts as the entry's metadata."""
    e = delivery.event
    metadata = {
        "topic": delivery.topic, "source": e.source, "subject": e.subject,
        "time": ledger_time(e.time), "sequence": e.sequence, "actor": e.actor,
        "role": e.actorrole, "site": e.actorsite, "correlation_id": e.correlationid,
        "causation_id": e.causationid, "reason": e.reason,
    }
    entry = NewEvent(type=e.type, data=e.data, event_id=e.id, schema_version=e.schemaversion,
                     metadata={k: v for k, v in metadata.items() if v is not None})
    return ledger_stream(e.subject, e.data), entry


def ledger_cloudevent(event_id: str, type_: str, schema_version: int, data: dict[str, Any],
                      metadata: Mapping[str, Any]) -> CloudEvent:
    """The envelope an entry was filed from: `ledger_entry`'s inverse (what `ViewPublisher`
    publishes of the ledger's own entries, D93)."""
    m = metadata
    return CloudEvent(id=event_id, source=m["source"], type=type_, subject=m["subject"],
                      time=m["time"], data=data, schemaversion=schema_version,
                      sequence=m["sequence"], correlationid=m.get("correlation_id"),
                      causationid=m.get("causation_id"), actor=m.get("actor"),
                      actorrole=m.get("role"), actorsite=m.get("site"), reason=m.get("reason"))


@files_under_event_id  # the ledger's entry is the consumer's processed mark (D89)
async def record(tx: Transaction, delivery: Delivery) -> None:
    """File the delivery's event in the ledger under its own id, once (a stored id: nothing)."""
    # The ledger holds each event id once (its consumer asks the same first, D89).
    if await tx.has_event(delivery.event.id):
        return
    stream, entry = ledger_entry(delivery)
    # Position is arrival order (docs/decisions.md, D6 and "Audit: the ledger files by patient").
    await tx.append(stream, [entry], None)


async def record_view(tx: Transaction, viewed: PatientDataViewed, who: Principal) -> None:
    """A read of the ledger's own patient history (D50), filed as every entry is: the envelope
    the audit service would have published, under the patient, in the chain."""
    request_id = current_request_id()
    event = CloudEvent(id=str(uuid.uuid4()), source=AUDIT_SOURCE, type=viewed.event_type(),
                       subject=viewed.subject(), time=viewed.viewed_at,
                       data=viewed.model_dump(mode="json"), sequence=0,
                       correlationid=request_id, actor=who.sub, actorrole=who.role,
                       actorsite=who.site)
    await record(tx, Delivery(event, viewed, ACCESS))
