"""Safety's consumer handlers: enrolment and dosing facts feed the rules; its own history is imported."""

from __future__ import annotations

from services.safety import domain
from services.safety.projection import SAFETY_TYPES, append_all, has_event, state_for_write, stream_for
from shared.consumer import Delivery, Handler
from shared.events import CATALOGUE
from shared.protocol import default_protocol
from shared.store import Metadata, NewEvent, Transaction

ENGINE_ACTOR = "system:safety-rules"
FACT_SOURCES = ("PatientEnrolled", "ArmAssigned", "ArmCrossedOver", "PatientWithdrawn",
                "InfusionGiven", "MethotrexateDoseGiven")


async def on_patient_fact(tx: Transaction, delivery: Delivery) -> None:
    """Record what the rules need from an enrolment or dosing event, then evaluate the rules."""
    assert delivery.data is not None
    protocol = default_protocol()
    state = await state_for_write(tx, protocol.trial_id)
    emitted = domain.decide_fact(protocol.safety, state, delivery.event.id, delivery.data)
    if not emitted or await has_event(tx, emitted[0][0]):
        return  # nothing for safety, or another consumer of this store recorded it already
    meta = Metadata(actor=ENGINE_ACTOR, correlation_id=delivery.event.correlationid,
                    causation_id=delivery.event.id)
    await append_all(tx, emitted, meta, meta)


async def on_safety_event(tx: Transaction, delivery: Delivery) -> None:
    """A safety event from trial.safety. Its own come back and are skipped; one this store lacks
    (a replay into a fresh database) is imported unchanged. Imports are never evaluated: each
    piece of evidence was evaluated once where it was made, in the same transaction, and the
    history carries what it caused."""
    e = delivery.event
    if delivery.data is None or await has_event(tx, e.id):
        return
    meta = Metadata(actor=e.actor, role=e.actorrole, site=e.actorsite,
                    correlation_id=e.correlationid, causation_id=e.causationid, reason=e.reason)
    await tx.append(stream_for(delivery.data), [NewEvent.of(delivery.data, meta, event_id=e.id)],
                    None)


def handlers() -> dict[str, Handler]:
    found: dict[str, Handler] = {t: on_patient_fact for t in FACT_SOURCES if t in CATALOGUE}
    found.update({t: on_safety_event for t in SAFETY_TYPES})
    return found
