"""The dosing use cases: load the patient's record (and the holds), decide (pure), append, in one
transaction. The API, the consumer handlers and the missed-visit sweep all come through here."""

from __future__ import annotations

from services.dosing import domain
from services.dosing import holds as holding
from shared.auth import Principal
from shared.clock import Clock
from shared.commands import Session, session
from shared.consumer import Delivery
from shared.errors import Refused
from shared.events import ArmAssigned, ArmCrossedOver, EventData, PatientWithdrawn
from shared.permissions import Action, authorize_patient
from shared.protocol import ProtocolConfig
from shared.store import EventStore, Metadata, Transaction

SWEEP_ACTOR = Metadata(actor="dosing-sweep", reason="visit window closed without a dose")


async def record_dose(store: EventStore, patient_id: str, who: Principal,
                      dose: domain.DoseCommand, protocol: ProtocolConfig,
                      meta: Metadata) -> list[EventData]:
    """The holds read here are the holds in force when the dose commits, so a hold consumed
    before the dose is always enforced; of two posts for one visit the second reads the first
    one's dose (or loses the version race: `ConcurrencyError`, answered 409 `conflict`)."""
    records = domain.records(protocol)
    async with session(store) as s:
        stream = domain.schedule_stream(patient_id)
        record = await s.load(records, stream)
        authorize_patient(who, Action.DOSE, record.site_id)
        new = records.decide(record, domain.GiveDose(dose, await s.load(holding.HOLDS,
                                                                       holding.HOLDS_STREAM)))
        await s.append(stream, new, meta)
    return new


async def schedule(store: EventStore, patient_id: str, who: Principal
                   ) -> tuple[domain.DosingRecord, holding.Holds]:
    """A patient's record and the holds in force, for a reader the patient's site allows."""
    record = domain.fold(e.payload() for e in
                         await store.read_stream(domain.schedule_stream(patient_id)))
    authorize_patient(who, Action.READ_PATIENT, record.site_id)
    if record.current is None:
        raise Refused("patient_not_found", "No such patient")
    holds = holding.fold(e.payload() for e in await store.read_stream(holding.HOLDS_STREAM))
    return record, holds


def _from_enrollment(event: EventData) -> domain.RecordCommand | None:
    match event:
        case ArmAssigned():
            return domain.StartCalendar(event)
        case PatientWithdrawn():
            return domain.EndForWithdrawal(event)
        case ArmCrossedOver():
            return domain.CrossOver(event)
    return None


async def take_enrollment_event(tx: Transaction, delivery: Delivery,
                                protocol: ProtocolConfig) -> None:
    """An assignment makes the calendar, a withdrawal ends it, a crossover starts the new arm's."""
    event = delivery.data
    command = _from_enrollment(event) if event is not None else None
    if event is None or command is None:
        return
    records = domain.records(protocol)
    s = Session(tx)
    stream = domain.schedule_stream(event.subject())  # all three are keyed by the patient
    await s.append(stream, records.decide(await s.load(records, stream), command),
                   delivery.caused_by())


async def take_safety_event(tx: Transaction, delivery: Delivery) -> None:
    """PatientDosingHeld, ArmSuspended, TrialHalted and SafetyHoldLifted, in one holds stream
    that every dose reads in its own transaction."""
    event = delivery.data
    assert isinstance(event, holding.SafetyEvent)
    s = Session(tx)
    await s.append(holding.HOLDS_STREAM,
                   holding.HOLDS.decide(await s.load(holding.HOLDS, holding.HOLDS_STREAM), event),
                   delivery.caused_by())


async def sweep_missed_visits(store: EventStore, clock: Clock, protocol: ProtocolConfig) -> int:
    """One pass over every calendar; returns how many visits it found missed.

    Each patient is decided inside its own store transaction, from the stream as it stands
    there, so a second pass (or a concurrent one) sees the first one's VisitMissed and adds none.
    """
    records = domain.records(protocol)
    found = 0
    prefix = domain.schedule_stream("")
    for stream in await store.stream_ids("DosingScheduleCreated"):
        if not stream.startswith(prefix):
            continue
        async with session(store) as s:
            missed = records.decide(await s.load(records, stream), domain.MarkMissed(clock.now()))
            await s.append(stream, missed, SWEEP_ACTOR)
            found += len(missed)
    return found
