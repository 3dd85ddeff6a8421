"""Randomization's consumer handlers: safety holds from trial.safety, kept as events of its own."""

from __future__ import annotations

from services.randomization import domain
from services.randomization.commands import HOLDS_STREAM
from shared.consumer import Delivery, Handler
from shared.store import Metadata, NewEvent, Transaction


async def on_safety_hold(tx: Transaction, delivery: Delivery) -> None:
    """A pause, halt, arm suspension or lift becomes an event in `safety-holds`; folding that
    stream at each randomization is what enforces it."""
    if delivery.data is None or (change := domain.hold_from_safety(delivery.data)) is None:
        return
    source = delivery.event
    meta = Metadata(actor=source.actor, role=source.actorrole, site=source.actorsite,
                    correlation_id=source.correlationid or source.id, causation_id=source.id,
                    reason=source.reason)
    await tx.append(HOLDS_STREAM, [NewEvent.of(change, meta)], None)


HANDLERS: dict[str, Handler] = {
    event_type: on_safety_hold
    for event_type in ("EnrollmentPaused", "TrialHalted", "ArmSuspended", "SafetyHoldLifted")
}
