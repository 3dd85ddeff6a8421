"""The safety use cases: load the safety state (the whole store's fold), decide (pure: the events
and every rule firing they cause), append, in one transaction. Routes and consumers both call
these."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from services.safety import domain
from services.safety.projection import SAFETY_TYPES, current_state, state_for_write, stream_for
from services.safety.rules import Emitted
from services.safety.state import SafetyState
from shared.auth import Principal
from shared.commands import Session, retried, session
from shared.consumer import Delivery
from shared.events import LabResult, StoppingRuleTriggered
from shared.permissions import Action, authorize_patient
from shared.protocol import ProtocolConfig
from shared.store import EventStore, Metadata, NewEvent, Transaction, utcnow

ENGINE_ACTOR = "system:safety-rules"


def fired(emitted: Sequence[Emitted]) -> list[str]:
    """The stopping rules a decision fired, in order."""
    return [e.rule_id for _, e in emitted if isinstance(e, StoppingRuleTriggered)]


def _engine(meta: Metadata, caused_by: str) -> Metadata:
    """Rule firings are the engine's, caused by the event that fired them, in the same request."""
    return Metadata(actor=ENGINE_ACTOR, request_id=meta.request_id,
                    correlation_id=meta.correlation_id, causation_id=caused_by)


async def _append(s: Session, emitted: Sequence[Emitted], first: Metadata,
                  consequences: Metadata) -> None:
    """In order: the first event with its caller's metadata, what it caused with the engine's."""
    for i, identified in enumerate(emitted):
        await s.append(stream_for(identified.event), [identified],
                       first if i == 0 else consequences)


@retried
async def _reported(store: EventStore, protocol: ProtocolConfig, patient_id: str,
                    who: Principal, command: domain.SafetyCommand, meta: Metadata) -> list[Emitted]:
    """A site's report about a patient: only for a patient safety knows, of the reporter's site."""
    decider = domain.safety(protocol)
    async with session(store) as s:
        state = await state_for_write(s.tx, protocol.trial_id)
        patient = domain.known_patient(state, patient_id)
        authorize_patient(who, Action.REPORT_SAFETY, patient.site_id)
        emitted = decider.decide(state, command)
        await _append(s, emitted, meta, _engine(meta, emitted[0].event_id))
    return emitted


async def report_adverse_event(store: EventStore, protocol: ProtocolConfig, who: Principal,
                               report: domain.ReportAdverseEvent, meta: Metadata
                               ) -> tuple[str, list[Emitted]]:
    adverse_event_id = "AE-" + uuid.uuid4().hex[:16].upper()
    command = domain.Report(report, adverse_event_id, utcnow())
    return adverse_event_id, await _reported(store, protocol, report.patient_id, who, command,
                                             meta)


async def follow_up(store: EventStore, protocol: ProtocolConfig, who: Principal,
                    follow_up: domain.FollowUp, meta: Metadata) -> tuple[str, list[Emitted]]:
    follow_up_id = "FU-" + uuid.uuid4().hex[:16].upper()
    command = domain.AddFollowUp(follow_up, follow_up_id, utcnow())
    return follow_up_id, await _reported(store, protocol, follow_up.patient_id, who, command,
                                         meta)


async def report_lab_result(store: EventStore, protocol: ProtocolConfig, who: Principal,
                            patient_id: str, collected_at: datetime,
                            results: tuple[LabResult, ...], meta: Metadata
                            ) -> tuple[str, list[Emitted]]:
    lab_result_id = "LAB-" + uuid.uuid4().hex[:16].upper()
    command = domain.ReportLab(patient_id, collected_at, results, lab_result_id, utcnow())
    return lab_result_id, await _reported(store, protocol, patient_id, who, command, meta)


def new_decision_id() -> str:
    """A DSMB decision's id: the holds it imposes are named after it."""
    return "DEC-" + uuid.uuid4().hex[:16].upper()


@retried
async def dsmb_decision(store: EventStore, protocol: ProtocolConfig,
                        decision: domain.Lift | domain.Impose, meta: Metadata) -> list[Emitted]:
    """A DSMB decision, to lift holds or to impose one (the role is checked by the route):
    every event it makes is the DSMB's own."""
    decider = domain.safety(protocol)
    async with session(store) as s:
        emitted = decider.decide(await state_for_write(s.tx, protocol.trial_id), decision)
        await _append(s, emitted, meta, meta)
    return emitted


async def take_patient_fact(tx: Transaction, delivery: Delivery,
                            protocol: ProtocolConfig) -> None:
    """Record what the rules need from an enrolment or dosing event, then evaluate the rules."""
    assert delivery.data is not None
    s = Session(tx)
    state = await state_for_write(tx, protocol.trial_id)
    emitted = domain.safety(protocol).decide(
        state, domain.RecordFact(delivery.event.id, delivery.data))
    if not emitted or await tx.has_event(emitted[0].event_id):
        return  # nothing for safety, or another consumer of this store recorded it already
    meta = Metadata(actor=ENGINE_ACTOR, correlation_id=delivery.event.correlationid,
                    causation_id=delivery.event.id)
    await _append(s, emitted, meta, meta)


async def import_safety_event(tx: Transaction, delivery: Delivery) -> None:
    """A safety event from trial.safety. Its own come back and are skipped; one this store lacks
    (a replay into a fresh database) is imported unchanged. Imports are never evaluated: each
    piece of evidence was evaluated once where it was made, in the same transaction, and the
    history carries what it caused."""
    e = delivery.event
    if delivery.data is None or await tx.has_event(e.id):
        return
    meta = Metadata(actor=e.actor, role=e.actorrole, site=e.actorsite,
                    correlation_id=e.correlationid, causation_id=e.causationid, reason=e.reason)
    await tx.append(stream_for(delivery.data), [NewEvent.of(delivery.data, meta, event_id=e.id)],
                    None)


async def state(store: EventStore, protocol: ProtocolConfig) -> SafetyState:
    """What safety knows now (for the status view)."""
    return await current_state(store, protocol.trial_id)


__all__ = [
    "SAFETY_TYPES",
    "dsmb_decision",
    "fired",
    "follow_up",
    "import_safety_event",
    "new_decision_id",
    "report_adverse_event",
    "report_lab_result",
    "state",
    "take_patient_fact",
]
