"""The randomization use cases: load the streams, decide (pure), append, in one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.randomization import domain
from shared.auth import Principal
from shared.commands import Session, Snapshot, retried, session
from shared.consumer import Delivery, Unapplied
from shared.errors import Refused
from shared.events import (
    AllocationSlotUsed,
    Arm,
    ArmAssigned,
    PatientScreened,
    RandomizationRecordResolved,
    RandomizationRecordUnapplied,
)
from shared.permissions import Action, authorize_patient, authorize_site
from shared.protocol import ProtocolConfig
from shared.store import EventStore, Metadata, StreamReader, Transaction, utcnow

ALLOCATION_STREAM = "allocation"  # every AllocationSlotUsed, trial-wide: version = numbers used
HOLDS_STREAM = "safety-holds"     # RandomizationHoldApplied / Lifted from trial.safety
ALLOCATION = Snapshot(domain.ALLOCATION, ALLOCATION_STREAM)  # read only what is new (D39)
PATIENT_NS = uuid.UUID("6f1c0a52-8f4e-4c1a-9d57-2b1e7d0c5a11")


def patient_stream(patient_id: str) -> str:
    return f"patient-{patient_id}"


def screening_stream(screening_id: str) -> str:
    return f"screening-{screening_id}"


def patient_id_for(screening_id: str) -> str:
    """Derived from the screening's random id: no name, initials or screening number in it."""
    return "PT-" + uuid.uuid5(PATIENT_NS, screening_id).hex[:12].upper()


async def load_patient(reader: StreamReader, patient_id: str) -> domain.Patient:
    return domain.fold([e.payload() for e in await reader.read_stream(patient_stream(patient_id))])


def visible_patient(patient: domain.Patient, who: Principal, action: Action) -> domain.Patient:
    """An unknown patient, and another site's, is `patient_not_found` (its existence must not
    leak); then the role must be allowed `action`."""
    if patient.patient_id is None:
        raise Refused("patient_not_found", "No such patient")
    authorize_patient(who, action, patient.site_id)
    return patient


@retried
async def screen(store: EventStore, facts: domain.ScreeningFacts, who: Principal,
                 protocol: ProtocolConfig, meta: Metadata) -> PatientScreened:
    authorize_site(who, Action.ENROL, facts.site_id)
    command = domain.Screen(str(uuid.uuid4()), facts, utcnow())
    async with session(store) as s:
        stream = screening_stream(command.screening_id)
        screenings = domain.screenings(protocol)
        new = screenings.decide(await s.load(screenings, stream), command)
        await s.append(stream, new, meta)
    screened = new[0]
    assert isinstance(screened, PatientScreened)
    return screened


@retried
async def enrol(store: EventStore, screening_id: str, who: Principal, protocol: ProtocolConfig,
                meta: Metadata) -> domain.Patient:
    patients = domain.patients(protocol)
    async with session(store) as s:
        screening = await s.load(domain.screenings(protocol), screening_stream(screening_id))
        if screening is not None and who.is_site_role and who.site != screening.site_id:
            screening = None  # another site's screening: as if it did not exist
        if screening is not None:
            authorize_site(who, Action.ENROL, screening.site_id)
        patient_id = patient_id_for(screening_id)
        stream = patient_stream(patient_id)
        new, patient = patients.run(await s.load(patients, stream),
                                    domain.Enrol(patient_id, screening, utcnow()))
        await s.append(stream, new, meta)
    return patient


@dataclass(frozen=True)
class Randomized:
    assignment: ArmAssigned
    created: bool  # False: the patient was randomized before, this is the first assignment


async def _holds(s: Session) -> domain.Holds:
    return await s.load(domain.HOLDS, HOLDS_STREAM)


@retried
async def randomize(store: EventStore, patient_id: str, who: Principal, protocol: ProtocolConfig,
                    secret: bytes, meta: Metadata) -> Randomized:
    patients = domain.patients(protocol)
    # The allocation is read and appended at one version: a randomization that commits in
    # between makes this one run again. Randomizations in this process queue for the allocation
    # rather than race for it, and are pipelined (D59): the next decides on the allocation this
    # one staged while this one commits, so queued randomizations share a group commit; each
    # commits only if the one before it did. Another replica's still meets them at the commit.
    async with session(store) as s:
        await s.tx.exclusive(ALLOCATION_STREAM, until="queued")
        stream = patient_stream(patient_id)
        # What the allocation is decided on, in one statement (D81): the lock waits one round
        # trip, not three.
        await s.read_ahead({stream: 0, HOLDS_STREAM: 0,
                            ALLOCATION_STREAM: ALLOCATION.version_to_read(s, staged=True)})
        patient = visible_patient(await s.load(patients, stream), who, Action.ENROL)
        if patient.assignment is not None:
            return Randomized(patient.assignment, created=False)
        allocation = await ALLOCATION.load(s, staged=True)
        new = patients.decide(patient, domain.Randomize(allocation, await _holds(s), secret,
                                                        utcnow()))
        slots = [e for e in new if isinstance(e, AllocationSlotUsed)]
        await s.append(ALLOCATION_STREAM, slots, meta)
        await s.append(stream, [e for e in new if not isinstance(e, AllocationSlotUsed)], meta)
        ALLOCATION.stage(s, domain.ALLOCATION.fold(slots, allocation))
    assigned = new[0]
    assert isinstance(assigned, ArmAssigned)
    return Randomized(assigned, created=True)


@retried
async def _decide_for_patient(
        store: EventStore, patient_id: str, who: Principal, action: Action,
        protocol: ProtocolConfig, command: Callable[[Session], Awaitable[domain.PatientCommand]],
        meta: Metadata) -> domain.Patient:
    """The one shape of a patient's command: load, check who may act, decide, append."""
    patients = domain.patients(protocol)
    async with session(store) as s:
        stream = patient_stream(patient_id)
        patient = visible_patient(await s.load(patients, stream), who, action)
        new, patient = patients.run(patient, await command(s))
        await s.append(stream, new, meta)
    return patient


async def withdraw(store: EventStore, patient_id: str, reason: str, who: Principal,
                   protocol: ProtocolConfig, meta: Metadata) -> domain.Patient:
    async def command(_: Session) -> domain.PatientCommand:
        return domain.Withdraw(reason, utcnow())

    return await _decide_for_patient(store, patient_id, who, Action.ENROL, protocol, command,
                                     meta)


async def cross_over(store: EventStore, patient_id: str, to_arm: Arm, reason: str,
                     who: Principal, protocol: ProtocolConfig, meta: Metadata) -> domain.Patient:
    async def command(s: Session) -> domain.PatientCommand:  # the holds as this write sees them
        return domain.CrossOver(to_arm, reason, await _holds(s), utcnow())

    return await _decide_for_patient(store, patient_id, who, Action.CROSSOVER, protocol,
                                     command, meta)


async def take_safety_event(tx: Transaction, delivery: Delivery) -> None:
    """A pause, halt, arm suspension or lift from trial.safety becomes an event of the holds
    stream; folding that stream at each randomization is what enforces it."""
    if delivery.data is None:
        return
    s = Session(tx)
    holds = await _holds(s)
    await s.append(HOLDS_STREAM, domain.HOLDS.decide(holds, delivery.data), delivery.caused_by())


async def take_efficacy_event(tx: Transaction, delivery: Delivery,
                              protocol: ProtocolConfig) -> None:
    """A disposition from trial.efficacy, noted in the patient's stream (GET shows it)."""
    if delivery.data is None:
        return
    patients = domain.patients(protocol)
    s = Session(tx)
    stream = patient_stream(delivery.data.subject())
    command = domain.NoteDisposition(delivery.data, delivery.event.id)
    await s.append(stream, patients.decide(await s.load(patients, stream), command),
                   delivery.caused_by())


# --- failing closed on trial.safety (D32) ----------------------------------------------------

CONSUMER_ACTOR = Metadata(actor="randomization-consumer",
                          reason="a trial.safety record could not be applied")


async def fail_closed_on_safety_record(tx: Transaction, unapplied: Unapplied) -> None:
    """A trial.safety record randomization could not apply: an arm it names counts as
    suspended, anything else stops randomization until an operator resolves it."""
    s = Session(tx)
    holds = await _holds(s)
    if unapplied.record_id in holds.unapplied:
        return
    await s.append(HOLDS_STREAM, [RandomizationRecordUnapplied.model_validate({
        "record_id": unapplied.record_id, **unapplied.names(), "error": unapplied.error[:2000],
        "detected_at": utcnow()})], CONSUMER_ACTOR)


async def unapplied_safety_records(store: EventStore) -> list[RandomizationRecordUnapplied]:
    holds = domain.fold_holds([e.payload() for e in await store.read_stream(HOLDS_STREAM)])
    return sorted(holds.unapplied.values(), key=lambda u: u.record_id)


@retried
async def resolve_safety_record(store: EventStore, record_id: str, by: str,
                                reason: str) -> RandomizationRecordResolved:
    """An operator's resolution (`trial resolve-safety-record --service randomization`)."""
    async with session(store) as s:
        unapplied = (await _holds(s)).unapplied.get(record_id)
        if unapplied is None:
            raise Refused("no_such_unapplied_record", f"No unresolved safety record {record_id}")
        resolved = RandomizationRecordResolved(
            record_id=record_id, scope=unapplied.scope, target=unapplied.target, resolved_by=by,
            reason=reason, resolved_at=utcnow())
        await s.append(HOLDS_STREAM, [resolved], Metadata(actor=by, reason=reason))
    return resolved
