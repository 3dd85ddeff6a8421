"""The efficacy use cases: load the patient's follow-up, decide (pure), append, in one
transaction. The API, the consumer handlers and the missed-assessment sweep all come through here."""

from __future__ import annotations

from services.efficacy import domain
from shared.auth import Principal
from shared.clock import Clock
from shared.commands import Session, retried, session
from shared.consumer import Delivery
from shared.errors import Refused
from shared.events import EventData
from shared.permissions import Action, authorize, authorize_patient
from shared.protocol import ProtocolConfig
from shared.store import EventStore, Metadata, Transaction

SWEEP_ACTOR = Metadata(actor=domain.SWEEP, reason="assessment window closed without an assessment")
STREAM_PREFIX = domain.followup_stream("")

PatientCommand = (domain.RecordAssessment | domain.CorrectAssessment
                  | domain.DiscontinueTreatment | domain.DeclareLost)


@retried
async def command_patient(store: EventStore, patient_id: str, who: Principal, action: Action,
                          command: PatientCommand, protocol: ProtocolConfig,
                          meta: Metadata) -> tuple[list[EventData], domain.FollowUp]:
    """A site's command on one patient: the patient's site must be the caller's (404 if not).
    Its events, and the follow-up after them: the answer is made from that, never from a read
    after the commit, which the database could refuse once the write stands (a 503 for a
    committed write, whose key a retry then finds outcome unknown)."""
    followups = domain.followups(protocol)
    async with session(store) as s:
        stream = domain.followup_stream(patient_id)
        state = await s.load(followups, stream)
        authorize_patient(who, action, state.site_id)
        new, after = followups.run(state, command)
        await s.append(stream, new, meta)
    return new, after


async def followup(store: EventStore, patient_id: str, who: Principal,
                   action: Action = Action.READ_PATIENT_EFFICACY) -> domain.FollowUp:
    state = domain.fold(e.payload() for e in
                        await store.read_stream(domain.followup_stream(patient_id)))
    authorize_patient(who, action, state.site_id)
    if state.randomized_arm is None:
        raise Refused("patient_not_found", "No such patient")
    return state


async def all_followups(store: EventStore, who: Principal) -> list[domain.FollowUp]:
    """Every randomized patient's follow-up (the trial-wide summary)."""
    authorize(who, Action.READ_EFFICACY_SUMMARY)
    found = []
    for stream in await store.stream_ids("FollowUpFactRecorded"):
        if stream.startswith(STREAM_PREFIX):
            state = domain.fold(e.payload() for e in await store.read_stream(stream))
            if state.randomized_arm is not None:
                found.append(state)
    return found


async def take_event(tx: Transaction, delivery: Delivery, protocol: ProtocolConfig) -> None:
    """An event of trial.enrollment, trial.dosing or trial.safety about a patient: what efficacy
    must know of it, recorded in the patient's follow-up."""
    event = delivery.data
    if event is None:
        return
    followups = domain.followups(protocol)
    s = Session(tx)
    stream = domain.followup_stream(event.subject())  # every event taken is keyed by patient
    learn = domain.Learn(event, delivery.event.id, delivery.event.time)
    await s.append(stream, followups.decide(await s.load(followups, stream), learn),
                   delivery.caused_by())


async def sweep_missed_assessments(store: EventStore, clock: Clock,
                                   protocol: ProtocolConfig) -> int:
    """One pass over every follow-up; returns how many events it recorded. Each patient is
    decided in a transaction of its own: a second pass, or a concurrent one, adds nothing."""
    followups = domain.followups(protocol)

    @retried
    async def sweep(stream: str) -> int:
        async with session(store) as s:
            state = await s.load(followups, stream)
            new = followups.decide(state, domain.Sweep(clock.now()))
            await s.append(stream, new, SWEEP_ACTOR)
        return len(new)

    return sum([await sweep(stream) for stream in await store.stream_ids("FollowUpFactRecorded")
                if stream.startswith(STREAM_PREFIX)])
