"""The safety aggregate's load: its state folded from the whole store, incrementally, each call
reading only the events it lacks; and where each safety event is filed."""

from __future__ import annotations

from typing import Protocol

from services.safety.state import SafetyState, fold
from shared.decider import Identified
from shared.events import (
    AdverseEventFollowedUp,
    AdverseEventReported,
    ArmSuspended,
    EnrollmentPaused,
    EventData,
    LabResultReported,
    PatientDosingHeld,
    PatientSafetyFactRecorded,
    SafetyHoldLifted,
    SeriousAdverseEventReportDue,
    StoppingRuleTriggered,
    SusarFollowUpReportDue,
    SusarReportDue,
    TrialHalted,
)
from shared.store import EventFilter, EventStore, RecordedEvent, Transaction

# The event types the safety service writes: anything else in a store is not safety's.
SAFETY_TYPES = frozenset(cls.event_type() for cls in (
    PatientSafetyFactRecorded, AdverseEventReported, AdverseEventFollowedUp, LabResultReported,
    StoppingRuleTriggered, PatientDosingHeld, ArmSuspended, EnrollmentPaused, TrialHalted,
    SafetyHoldLifted, SusarReportDue, SusarFollowUpReportDue, SeriousAdverseEventReportDue))
_SAFETY_EVENTS = EventFilter(types=tuple(sorted(SAFETY_TYPES)))
SAFETY_STATE = "safety-state"  # the name of the lock that safety's decisions queue on


class Reader(Protocol):
    async def read_all(self, after: int = 0, limit: int | None = None,
                       where: EventFilter = ...) -> list[RecordedEvent]: ...


class Projection:
    """A cached fold of one store. Positions are gapless and commit-ordered (docs D1), so any
    read of `position > cached` is exactly the missing suffix, on any replica."""

    def __init__(self, trial_id: str) -> None:
        self.state = SafetyState(trial_id)
        self.position = 0

    async def load(self, reader: Reader) -> SafetyState:
        """Call at the start of a transaction (before appending), or with the store's reader."""
        state, position = self.state, self.position
        new = await reader.read_all(after=position, limit=None, where=_SAFETY_EVENTS)
        if new:
            state = fold(state.trial_id, (Identified(e.event_id, e.payload()) for e in new), state)
            position = new[-1].position
        if position > self.position:  # concurrent readers: keep the furthest fold
            self.state, self.position = state, position
        return state


_projections: dict[str, Projection] = {}


def _projection(url: object, trial_id: str) -> Projection:
    # One cache per database (the read and the write engine of a store share its URL).
    return _projections.setdefault(f"{url}#{trial_id}", Projection(trial_id))


async def state_for_write(tx: Transaction, trial_id: str) -> SafetyState:
    """The state a decision is made on: call before the transaction appends anything. Its
    commit checks that the store's head has not moved since (D39); this process's safety
    decisions queue for the state rather than race for it."""
    await tx.exclusive(SAFETY_STATE)
    return await _projection(tx.store.url, trial_id).load(tx)


async def current_state(store: EventStore, trial_id: str) -> SafetyState:
    return await _projection(store.url, trial_id).load(store)


def stream_for(event: EventData) -> str:
    """Where each safety event lives: the patient's, arm's, trial's or rule's stream."""
    match event:
        case StoppingRuleTriggered():
            return f"rule-{event.rule_id}"
        case ArmSuspended() | EnrollmentPaused() | TrialHalted() | SafetyHoldLifted():
            return f"{event.scope}-{event.target}"
    patient_id: str = event.patient_id  # type: ignore[attr-defined]
    return f"patient-{patient_id}"
