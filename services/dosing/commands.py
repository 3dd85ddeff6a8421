"""The dosing use cases: load the patient's record (and the holds), decide (pure), append, in one
transaction. The API, the consumer handlers and the missed-visit sweep all come through here."""

from __future__ import annotations

from services.dosing import domain
from services.dosing import holds as holding
from shared.auth import Principal
from shared.clock import Clock
from shared.commands import Session, retried, session
from shared.consumer import Delivery, Unapplied
from shared.errors import Refused
from shared.events import (
    ArmAssigned,
    ArmCrossedOver,
    EventData,
    PatientWithdrawn,
    SafetyRecordResolved,
    SafetyRecordUnapplied,
)
from shared.permissions import Action, authorize_patient
from shared.protocol import ProtocolConfig
from shared.store import EventStore, Metadata, Transaction, utcnow

SWEEP_ACTOR = Metadata(actor="dosing-sweep", reason="visit window closed without a dose")


@retried
async def record_dose(store: EventStore, patient_id: str, who: Principal,
                      dose: domain.DoseCommand, protocol: ProtocolConfig,
                      meta: Metadata) -> list[EventData]:
    """The holds read here are the holds in force when the dose commits: a hold that commits
    between this read and the dose's commit moves the holds stream, so the dose runs again and
    reads it. Of two posts for one visit the second reads the first one's dose (D10, D39)."""
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
    stream = domain.schedule_stream(patient_id)
    found = await store.read_streams(stream, holding.HOLDS_STREAM)
    record = domain.fold(e.payload() for e in found[stream])
    authorize_patient(who, Action.READ_PATIENT, record.site_id)
    if record.current is None:
        raise Refused("patient_not_found", "No such patient")
    return record, holding.fold(e.payload() for e in found[holding.HOLDS_STREAM])


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


async def take_efficacy_event(tx: Transaction, delivery: Delivery,
                              protocol: ProtocolConfig) -> None:
    """An assessment done or missed, or a disposition: the schedule shows it, and after a
    treatment discontinuation (or the study's end) no dose is given."""
    event = delivery.data
    if event is None:
        return
    records = domain.records(protocol)
    s = Session(tx)
    stream = domain.schedule_stream(event.subject())
    notice = domain.EfficacyNotice(event, delivery.event.id)
    await s.append(stream, records.decide(await s.load(records, stream), notice),
                   delivery.caused_by())


async def records_at(store: EventStore, site_id: str | None) -> list[domain.DosingRecord]:
    """Every patient's dosing record (at one site, or everywhere)."""
    prefix = domain.schedule_stream("")
    found = []
    for stream in await store.stream_ids("DosingScheduleCreated"):
        if stream.startswith(prefix):
            record = domain.fold(e.payload() for e in await store.read_stream(stream))
            if site_id is None or record.site_id == site_id:
                found.append(record)
    return found


async def take_safety_event(tx: Transaction, delivery: Delivery) -> None:
    """PatientDosingHeld, ArmSuspended, TrialHalted and SafetyHoldLifted, in one holds stream
    that every dose reads in its own transaction."""
    event = delivery.data
    assert isinstance(event, holding.SafetyEvent)
    s = Session(tx)
    # A hold applies from when safety decided it (its record's time), not from when dosing
    # heard of it: a dose given in between is refused; one given before, a late entry.
    notice = holding.SafetyNotice(event, delivery.event.time)
    await s.append(holding.HOLDS_STREAM,
                   holding.HOLDS.decide(await s.load(holding.HOLDS, holding.HOLDS_STREAM), notice),
                   delivery.caused_by())


async def sweep_missed_visits(store: EventStore, clock: Clock, protocol: ProtocolConfig) -> int:
    """One pass over every calendar; returns how many visits it found missed.

    Each patient is decided inside its own store transaction, from the stream as it stands
    there, so a second pass (or a concurrent one) sees the first one's VisitMissed and adds none.
    """
    records = domain.records(protocol)

    @retried
    async def sweep(stream: str) -> int:
        async with session(store) as s:
            record = await s.load(records, stream)
            holds = await s.load(holding.HOLDS, holding.HOLDS_STREAM)
            missed = records.decide(record, domain.MarkMissed(clock.now(), holds))
            await s.append(stream, missed, SWEEP_ACTOR)
        return len(missed)

    prefix = domain.schedule_stream("")
    return sum([await sweep(stream) for stream in await store.stream_ids("DosingScheduleCreated")
                if stream.startswith(prefix)])


# --- failing closed on trial.safety (D32) ----------------------------------------------------

CONSUMER_ACTOR = Metadata(actor="dosing-consumer",
                          reason="a trial.safety record could not be applied")


async def fail_closed_on_safety_record(tx: Transaction, unapplied: Unapplied) -> None:
    """A trial.safety record dosing could not apply: the doses it may concern are refused
    (every dose when it names no one readable) until an operator resolves it."""
    s = Session(tx)
    holds = await s.load(holding.HOLDS, holding.HOLDS_STREAM)
    if unapplied.record_id in holds.unapplied:
        return
    await s.append(holding.HOLDS_STREAM, [SafetyRecordUnapplied.model_validate({
        "record_id": unapplied.record_id, **unapplied.names(), "error": unapplied.error[:2000],
        "detected_at": utcnow()})], CONSUMER_ACTOR)


async def unapplied_safety_records(store: EventStore) -> list[SafetyRecordUnapplied]:
    holds = holding.fold(e.payload() for e in await store.read_stream(holding.HOLDS_STREAM))
    return sorted(holds.unapplied.values(), key=lambda u: u.record_id)


@retried
async def resolve_safety_record(store: EventStore, record_id: str, by: str,
                                reason: str) -> SafetyRecordResolved:
    """An operator's resolution (`trial resolve-safety-record`): the block it caused ends."""
    async with session(store) as s:
        holds = await s.load(holding.HOLDS, holding.HOLDS_STREAM)
        unapplied = holds.unapplied.get(record_id)
        if unapplied is None:
            raise Refused("no_such_unapplied_record", f"No unresolved safety record {record_id}")
        resolved = SafetyRecordResolved(record_id=record_id, scope=unapplied.scope,
                                        target=unapplied.target, resolved_by=by, reason=reason,
                                        resolved_at=utcnow())
        await s.append(holding.HOLDS_STREAM, [resolved], Metadata(actor=by, reason=reason))
    return resolved
