"""Dosing's consumer handlers: an assignment creates the patient's calendar."""

from __future__ import annotations

from services.dosing import domain
from shared.consumer import Delivery
from shared.events import ArmAssigned
from shared.protocol import default_protocol
from shared.store import Metadata, NewEvent, Transaction


def schedule_stream(patient_id: str) -> str:
    return f"schedule-{patient_id}"


async def on_arm_assigned(tx: Transaction, delivery: Delivery) -> None:
    assigned = delivery.data
    assert isinstance(assigned, ArmAssigned)
    stream = schedule_stream(assigned.patient_id)
    if await tx.stream_version(stream) > 0:
        return  # a calendar exists; crossover replaces it explicitly (issue 4)
    schedule = domain.calendar(assigned, default_protocol())
    meta = Metadata(actor=delivery.event.actor, role=delivery.event.actorrole,
                    site=delivery.event.actorsite,
                    correlation_id=delivery.event.correlationid, causation_id=delivery.event.id)
    await tx.append(stream, [NewEvent.of(schedule, meta)], 0)
