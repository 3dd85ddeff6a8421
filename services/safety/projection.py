"""The safety aggregate's load: its state folded from the whole store, incrementally, each call
reading only the events it lacks; and where each safety event is filed.

A load streams: it scans the store in pages of undecoded rows (`scan`), parses each safety
row's data straight from its JSON text (`RawEvent.payload`) and folds page after page into one
`Draft` (services/safety/state.py), frozen once at the end; so its memory grows with the state,
not with the events read, and it copies the cached state's collections once a load."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from services.safety.state import Draft, SafetyState
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
from shared.store import EventFilter, EventStore, RawEvent, Transaction

# The event types the safety service writes: anything else in a store is not safety's.
SAFETY_TYPES = frozenset(cls.event_type() for cls in (
    PatientSafetyFactRecorded, AdverseEventReported, AdverseEventFollowedUp, LabResultReported,
    StoppingRuleTriggered, PatientDosingHeld, ArmSuspended, EnrollmentPaused, TrialHalted,
    SafetyHoldLifted, SusarReportDue, SusarFollowUpReportDue, SeriousAdverseEventReportDue))
SAFETY_STATE = "safety-state"  # the name of the lock that safety's decisions queue on


class Reader(Protocol):
    """`EventStore` or `Transaction` (whose commit then checks the head it noted at the scan)."""

    def scan(self, after: int = 0, where: EventFilter = ...,
             page: int = ...) -> AsyncIterator[list[RawEvent]]: ...


class Projection:
    """A cached fold of one store. Positions are gapless and commit-ordered (docs D1), so any
    read of `position > cached` is exactly the missing suffix, on any replica."""

    def __init__(self, trial_id: str) -> None:
        self.state = SafetyState(trial_id)
        self.position = 0

    async def load(self, reader: Reader) -> SafetyState:
        """Call at the start of a transaction (before appending), or with the store's reader.
        The state returned is never changed afterwards: later loads fold on copies of it."""
        draft, position = Draft(self.state), self.position
        # Every row, safety's picked here: with `where=` types, SQLite reads each page by the
        # type index and sorts it, at half the rows a second (scan of 200,000 events: 84,000
        # rows a CPU second, against 170,000 unfiltered); the few other rows of a safety store
        # (AccessDenied) cost a row each, never a parse.
        pages = reader.scan(after=position)
        try:
            async for page in pages:
                draft.apply(Identified(e.event_id, e.payload()) for e in page
                            if e.type in SAFETY_TYPES)
                position = page[-1].position
        finally:  # a failed parse hands the scan's connection back at once
            close = getattr(pages, "aclose", None)
            if close is not None:
                await close()
        state = draft.freeze()
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
