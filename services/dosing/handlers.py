"""Dosing's consumer handlers: assignments, withdrawals and crossovers shape calendars; safety
events become dosing holds."""

from __future__ import annotations

from collections.abc import Sequence

from services.dosing import domain
from services.dosing import holds as holding
from services.dosing.config import protocol
from shared.consumer import Delivery
from shared.events import ArmAssigned, ArmCrossedOver, EventData, PatientWithdrawn
from shared.store import Metadata, NewEvent, Transaction

schedule_stream = domain.schedule_stream  # kept importable from here for older callers


def caused_by(delivery: Delivery) -> Metadata:
    """Consumer-triggered writes name the event that caused them and carry its correlation."""
    e = delivery.event
    return Metadata(actor=e.actor, role=e.actorrole, site=e.actorsite,
                    correlation_id=e.correlationid or e.id, causation_id=e.id, reason=e.reason)


async def _append(tx: Transaction, stream: str, version: int, new: Sequence[EventData],
                  meta: Metadata) -> None:
    if new:
        await tx.append(stream, [NewEvent.of(e, meta) for e in new], version)


async def load_record(tx: Transaction, patient_id: str) -> tuple[domain.DosingRecord, int]:
    stream = await tx.read_stream(domain.schedule_stream(patient_id))
    return domain.fold(e.payload() for e in stream), len(stream)


async def load_holds(tx: Transaction) -> tuple[holding.Holds, int]:
    stream = await tx.read_stream(holding.HOLDS_STREAM)
    return holding.fold(e.payload() for e in stream), len(stream)


async def on_arm_assigned(tx: Transaction, delivery: Delivery) -> None:
    assigned = delivery.data
    assert isinstance(assigned, ArmAssigned)
    stream = domain.schedule_stream(assigned.patient_id)
    if await tx.stream_version(stream) > 0:
        return  # a calendar exists; only a crossover adds another
    await _append(tx, stream, 0, [domain.calendar_for(assigned, protocol())],
                  caused_by(delivery))


async def on_patient_withdrawn(tx: Transaction, delivery: Delivery) -> None:
    withdrawn = delivery.data
    assert isinstance(withdrawn, PatientWithdrawn)
    record, version = await load_record(tx, withdrawn.patient_id)
    await _append(tx, domain.schedule_stream(withdrawn.patient_id), version,
                  domain.decide_withdrawal(record, withdrawn), caused_by(delivery))


async def on_arm_crossed_over(tx: Transaction, delivery: Delivery) -> None:
    crossed = delivery.data
    assert isinstance(crossed, ArmCrossedOver)
    record, version = await load_record(tx, crossed.patient_id)
    await _append(tx, domain.schedule_stream(crossed.patient_id), version,
                  domain.decide_crossover(record, crossed, protocol()),
                  caused_by(delivery))


async def on_safety_hold(tx: Transaction, delivery: Delivery) -> None:
    """PatientDosingHeld, ArmSuspended, TrialHalted and SafetyHoldLifted, in one holds stream
    that every dose reads in its own transaction."""
    event = delivery.data
    assert isinstance(event, holding.SafetyEvent)
    state, version = await load_holds(tx)
    await _append(tx, holding.HOLDS_STREAM, version, holding.decide(state, event),
                  caused_by(delivery))


HANDLERS = {
    "ArmAssigned": on_arm_assigned,
    "PatientWithdrawn": on_patient_withdrawn,
    "ArmCrossedOver": on_arm_crossed_over,
    "PatientDosingHeld": on_safety_hold,
    "ArmSuspended": on_safety_hold,
    "TrialHalted": on_safety_hold,
    "SafetyHoldLifted": on_safety_hold,
}
