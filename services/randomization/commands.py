"""The randomization service layer: load the streams, run the domain, append in one transaction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from services.randomization import domain
from shared.auth import Principal
from shared.events import Arm, ArmAssigned, ArmCrossedOver, PatientScreened, PatientWithdrawn
from shared.permissions import Action, authorize_patient, authorize_site
from shared.protocol import ProtocolConfig
from shared.store import EventStore, Metadata, NewEvent, StreamReader, utcnow
from shared.web import Problem

ALLOCATION_STREAM = "allocation"  # every AllocationSlotUsed, trial-wide: version = numbers used
HOLDS_STREAM = "safety-holds"     # RandomizationHoldApplied / Lifted from trial.safety
PATIENT_NS = uuid.UUID("6f1c0a52-8f4e-4c1a-9d57-2b1e7d0c5a11")


def patient_stream(patient_id: str) -> str:
    return f"patient-{patient_id}"


def screening_stream(screening_id: str) -> str:
    return f"screening-{screening_id}"


def patient_id_for(screening_id: str) -> str:
    """Derived from the screening's random id: no name, initials or screening number in it."""
    return "PT-" + uuid.uuid5(PATIENT_NS, screening_id).hex[:12].upper()


async def load_patient(reader: StreamReader, patient_id: str) -> tuple[domain.Patient, int]:
    stream = await reader.read_stream(patient_stream(patient_id))
    return domain.fold([e.payload() for e in stream]), len(stream)


def visible_patient(patient: domain.Patient, who: Principal, action: Action) -> domain.Patient:
    """404 for an unknown patient and for another site's (its existence must not leak)."""
    if patient.patient_id is None:
        raise Problem(404, "patient_not_found", "No such patient")
    authorize_patient(who, action, patient.site_id)
    return patient


async def screen(store: EventStore, facts: domain.ScreeningFacts, who: Principal,
                 protocol: ProtocolConfig, meta: Metadata) -> PatientScreened:
    authorize_site(who, Action.ENROL, facts.site_id)
    now = utcnow()
    reasons = domain.eligibility(facts, now.date(), protocol.eligibility)
    screening_id = str(uuid.uuid4())
    event = PatientScreened(
        screening_id=screening_id, site_id=facts.site_id, screening_number=facts.screening_number,
        eligible=not reasons, reasons=tuple(reasons),
        age_years=domain.age_on(facts.birth_date, now.date()), weight_kg=facts.weight_kg,
        pasi=facts.pasi, protocol_version=protocol.version, screened_at=now)
    await store.append(screening_stream(screening_id), [NewEvent.of(event, meta)], 0)
    return event


async def enrol(store: EventStore, screening_id: str, who: Principal,
                meta: Metadata) -> domain.Patient:
    patient_id = patient_id_for(screening_id)
    async with store.transaction() as tx:
        screened = await tx.read_stream(screening_stream(screening_id))
        screening = screened[0].payload() if screened else None
        assert screening is None or isinstance(screening, PatientScreened)
        if screening is not None and who.is_site_role and who.site != screening.site_id:
            screening = None  # another site's screening: as if it did not exist
        if screening is not None:
            authorize_site(who, Action.ENROL, screening.site_id)
        patient, version = await load_patient(tx, patient_id)
        event = domain.decide_enrol(screening, patient, patient_id, utcnow())
        await tx.append(patient_stream(patient_id), [NewEvent.of(event, meta)], version)
    return domain.evolve(patient, event)


@dataclass(frozen=True)
class Randomized:
    assignment: ArmAssigned
    created: bool  # False: the patient was randomized before, this is the first assignment


async def randomize(store: EventStore, patient_id: str, who: Principal, protocol: ProtocolConfig,
                    secret: bytes, meta: Metadata) -> Randomized:
    # Under the store's write lock the allocation stream cannot move between read and append;
    # the expected versions still guard both streams, should a writer ever bypass the lock.
    async with store.transaction() as tx:
        patient, version = await load_patient(tx, patient_id)
        visible_patient(patient, who, Action.ENROL)
        if patient.assignment is not None:
            return Randomized(patient.assignment, created=False)
        allocation_events = await tx.read_stream(ALLOCATION_STREAM)
        allocation = domain.fold_allocation([e.payload() for e in allocation_events])
        holds = domain.fold_holds([e.payload() for e in await tx.read_stream(HOLDS_STREAM)])
        assigned, used = domain.decide_randomize(patient, allocation, holds, protocol, secret,
                                                 utcnow())
        await tx.append(ALLOCATION_STREAM, [NewEvent.of(used, meta)], len(allocation_events))
        await tx.append(patient_stream(patient_id), [NewEvent.of(assigned, meta)], version)
    return Randomized(assigned, created=True)


async def withdraw(store: EventStore, patient_id: str, reason: str, who: Principal,
                   meta: Metadata) -> domain.Patient:
    async with store.transaction() as tx:
        patient, version = await load_patient(tx, patient_id)
        visible_patient(patient, who, Action.ENROL)
        event: PatientWithdrawn = domain.decide_withdraw(patient, reason, utcnow())
        await tx.append(patient_stream(patient_id), [NewEvent.of(event, meta)], version)
    return domain.evolve(patient, event)


async def cross_over(store: EventStore, patient_id: str, to_arm: Arm, reason: str,
                     who: Principal, protocol: ProtocolConfig, meta: Metadata) -> domain.Patient:
    async with store.transaction() as tx:
        patient, version = await load_patient(tx, patient_id)
        visible_patient(patient, who, Action.CROSSOVER)
        holds = domain.fold_holds([e.payload() for e in await tx.read_stream(HOLDS_STREAM)])
        event: ArmCrossedOver = domain.decide_crossover(patient, to_arm, reason, holds, protocol,
                                                        utcnow())
        await tx.append(patient_stream(patient_id), [NewEvent.of(event, meta)], version)
    return domain.evolve(patient, event)
