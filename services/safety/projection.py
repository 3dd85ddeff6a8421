"""The safety state of one store, folded incrementally: each call reads only the events it lacks."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from services.safety.rules import Emitted
from services.safety.state import SafetyState, evolve
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
    StoppingRuleTriggered,
    SusarReportDue,
    TrialHalted,
    parse_data,
)
from shared.schema import events
from shared.store import EventStore, Metadata, NewEvent, Transaction

# The event types the safety service writes: anything else in a store is not safety's.
SAFETY_TYPES = frozenset(cls.event_type() for cls in (
    PatientSafetyFactRecorded, AdverseEventReported, AdverseEventFollowedUp, LabResultReported,
    StoppingRuleTriggered, PatientDosingHeld, ArmSuspended, EnrollmentPaused, TrialHalted,
    SafetyHoldLifted, SusarReportDue))


class Projection:
    """A cached fold of one store. Positions are gapless and commit-ordered (docs D1), so any
    read of `position > cached` is exactly the missing suffix, on any replica."""

    def __init__(self, trial_id: str) -> None:
        self.state = SafetyState(trial_id)
        self.position = 0

    async def load(self, conn: AsyncConnection) -> SafetyState:
        """Call at the start of a transaction (before appending), or on a read connection."""
        state, position = self.state, self.position
        q = sa.select(events.c.position, events.c.event_id, events.c.type, events.c.data).where(
            events.c.position > position).order_by(events.c.position)
        for row in await conn.execute(q):
            if row.type in SAFETY_TYPES:
                state = evolve(state, row.event_id, parse_data(row.type, row.data))
            position = row.position
        if position > self.position:  # concurrent readers: keep the furthest fold
            self.state, self.position = state, position
        return state


_projections: dict[str, Projection] = {}


def _projection(url: object, trial_id: str) -> Projection:
    # One cache per database (the read and the write engine of a store share its URL).
    return _projections.setdefault(f"{url}#{trial_id}", Projection(trial_id))


async def state_for_write(tx: Transaction, trial_id: str) -> SafetyState:
    """The state under the store's write lock: call before the transaction appends anything."""
    return await _projection(tx.conn.engine.url, trial_id).load(tx.conn)


async def current_state(store: EventStore, trial_id: str) -> SafetyState:
    async with store.read_engine.connect() as conn:
        return await _projection(store.engine.url, trial_id).load(conn)


def stream_for(event: EventData) -> str:
    """Where each safety event lives: the patient's, arm's, trial's or rule's stream."""
    match event:
        case StoppingRuleTriggered():
            return f"rule-{event.rule_id}"
        case ArmSuspended():
            return f"arm-{event.arm}"
        case EnrollmentPaused() | TrialHalted():
            return f"trial-{event.trial_id}"
        case SafetyHoldLifted():
            return f"{event.scope}-{event.target}"
    patient_id: str = event.patient_id  # type: ignore[attr-defined]
    return f"patient-{patient_id}"


async def append_all(tx: Transaction, emitted: Sequence[Emitted], first: Metadata,
                     consequence: Metadata) -> None:
    """Append in order: the first event with the caller's metadata, rule firings with the
    engine's (caused by the first event)."""
    for i, (event_id, event) in enumerate(emitted):
        meta = first if i == 0 else consequence
        await tx.append(stream_for(event), [NewEvent.of(event, meta, event_id=event_id)], None)


async def has_event(tx: Transaction, event_id: str) -> bool:
    q = sa.select(sa.literal(1)).where(events.c.event_id == event_id)
    return (await tx.conn.execute(q)).first() is not None
