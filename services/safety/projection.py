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
    model_for,
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
        # The last decision's fold of its transaction's staged events: (transaction, the
        # committed state it was folded on, how many staged events, the last one's id, state).
        self._staged: tuple[Transaction, SafetyState, int, str, SafetyState] | None = None

    async def load(self, reader: Reader) -> SafetyState:
        """The store's state, with the store's reader (a transaction: `load_for`).
        The state returned is never changed afterwards: later loads fold on copies of it."""
        return await self._fold(reader.scan(after=self.position))

    async def load_for(self, tx: Transaction) -> SafetyState:
        """The state a decision in `tx` is made on: the store's, then the safety events `tx`
        has staged (earlier records of a consumer's shared transaction, D78), folded in the
        order its commit will append them, after every stored event; so a decision sees exactly
        what it would have seen had each earlier record committed first (D80). The staged part
        is never cached beyond the transaction: a staged event may yet be taken back. Folded on
        from the previous decision's fold while the transaction has only added to its staging,
        so a transaction of N records folds its staged events once, not N times."""
        committed = await self._fold(tx.scan(after=self.position, staged_folded=True))
        staged = [new for new in tx.staged() if new.type in SAFETY_TYPES]
        if not staged:
            return committed
        base, done = committed, 0
        kept = self._staged
        if (kept is not None and kept[0] is tx and kept[1] is committed and kept[2] <= len(staged)
                and staged[kept[2] - 1].event_id == kept[3]):
            base, done = kept[4], kept[2]
        draft = Draft(base)
        draft.apply(Identified(new.event_id, model_for(new.type).model_validate(new.data))
                    for new in staged[done:])
        state = draft.freeze()
        self._staged = (tx, committed, len(staged), staged[-1].event_id, state)
        return state

    async def _fold(self, pages: AsyncIterator[list[RawEvent]]) -> SafetyState:
        draft, position = Draft(self.state), self.position
        # Every row, safety's picked here: with `where=` types, SQLite reads each page by the
        # type index and sorts it, at half the rows a second (scan of 200,000 events: 84,000
        # rows a CPU second, against 170,000 unfiltered); the few other rows of a safety store
        # (AccessDenied) cost a row each, never a parse.
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
    """The state a decision is made on, with what `tx` has staged already (D80). Its commit
    checks that the store's head has not moved since (D39); this process's safety decisions
    queue for the state rather than race for it."""
    await tx.exclusive(SAFETY_STATE)
    return await _projection(tx.store.url, trial_id).load_for(tx)


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
