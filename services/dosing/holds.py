"""Pure safety holds: which holds are in force, what a safety event changes, whom a hold stops."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal

from shared.decider import Decider
from shared.events import (
    ArmSuspended,
    DosingHeld,
    DosingResumed,
    EventData,
    PatientDosingHeld,
    SafetyHoldLifted,
    SafetyRecordResolved,
    SafetyRecordUnapplied,
    TrialHalted,
)

HOLDS_STREAM = "holds"
DoseKind = Literal["infusion", "methotrexate"]


@dataclass(frozen=True)
class Holds:
    """Holds in force by hold id, and every hold id ever seen (a lifted hold never returns);
    and the safety records dosing could not apply and no operator has resolved yet (D32)."""

    active: dict[str, DosingHeld] = field(default_factory=dict)
    seen: frozenset[str] = frozenset()
    unapplied: dict[str, SafetyRecordUnapplied] = field(default_factory=dict)
    # Lifted holds and when the lift took effect: a dose given in between is still refused.
    lifted: tuple[tuple[DosingHeld, datetime], ...] = ()


def evolve(state: Holds, event: EventData) -> Holds:
    match event:
        case DosingHeld():
            return replace(state, active={**state.active, event.hold_id: event},
                           seen=state.seen | {event.hold_id})
        case DosingResumed():
            active = {k: v for k, v in state.active.items() if k != event.hold_id}
            held = state.active.get(event.hold_id)
            lifted = state.lifted if held is None or event.resumed_from is None else (
                *state.lifted, (held, event.resumed_from))
            return replace(state, active=active, lifted=lifted)
        case SafetyRecordUnapplied():
            return replace(state, unapplied={**state.unapplied, event.record_id: event})
        case SafetyRecordResolved():
            return replace(state, unapplied={k: v for k, v in state.unapplied.items()
                                             if k != event.record_id})
    return state


def fold(events: Iterable[EventData]) -> Holds:
    return HOLDS.fold(events)


# The safety events that stop or restart dosing (an enrolment pause does not stop dosing).
SafetyEvent = PatientDosingHeld | ArmSuspended | TrialHalted | SafetyHoldLifted


@dataclass(frozen=True)
class SafetyNotice:
    """A safety event as dosing takes it: `at` is when safety decided it (the record's time)."""

    event: SafetyEvent
    at: datetime | None = None


def decide(state: Holds, event: SafetyEvent, at: datetime | None = None) -> list[EventData]:
    """A safety hold becomes a dosing hold from the moment safety decided it (`at`; unknown:
    from always, so every dose is stopped); a lift resumes exactly the hold it names."""
    match event:
        case SafetyHoldLifted():
            held = state.active.get(event.hold_id)
            if held is None:
                return []  # not in force (never seen, or lifted already): nothing to resume
            return [DosingResumed(scope=held.scope, target=held.target, rule_id=held.rule_id,
                                  hold_id=held.hold_id, product=held.product, resumed_from=at)]
        case PatientDosingHeld() | ArmSuspended() | TrialHalted() if event.hold_id not in state.seen:
            product = event.product if isinstance(event, PatientDosingHeld) else "any"
            return [DosingHeld(scope=event.scope, target=event.target, rule_id=event.rule_id,
                               hold_id=event.hold_id, product=product, held_from=at)]
    return []


# Commanded by trial.safety's events, each taken as it comes.
HOLDS: Decider[Holds, SafetyNotice, EventData] = Decider(
    Holds(), evolve, lambda state, notice: decide(state, notice.event, notice.at))


def _over(h: DosingHeld | SafetyRecordUnapplied, patient_id: str, arm: str) -> bool:
    return (h.scope == "trial" or (h.scope == "arm" and h.target == arm)
            or (h.scope == "patient" and h.target == patient_id))


def applying_to(state: Holds, patient_id: str, arm: str) -> list[DosingHeld]:
    """The holds in force over this patient: its own, its arm's, the trial's."""
    return [h for h in state.active.values() if _over(h, patient_id, arm)]


def unapplied_over(state: Holds, patient_id: str, arm: str) -> SafetyRecordUnapplied | None:
    """An unresolved safety record that may concern this patient: its own, its arm's, or one
    naming the trial or no one readable (then every patient)."""
    return next((u for u in state.unapplied.values() if _over(u, patient_id, arm)), None)


def _covers(h: DosingHeld, patient_id: str, arm: str, kind: DoseKind) -> bool:
    return _over(h, patient_id, arm) and h.product in ("any", kind)


def covering(state: Holds, patient_id: str, arm: str, kind: DoseKind) -> list[DosingHeld]:
    """The holds in force over this patient that cover this product."""
    return [h for h in state.active.values() if _covers(h, patient_id, arm, kind)]


def blocking(state: Holds, patient_id: str, arm: str, kind: DoseKind,
             given_at: datetime | None = None) -> DosingHeld | None:
    """The first hold that stops a dose given at `given_at`: every covering hold in force that
    took effect before then, or whose start is unknown (fails closed); and a lifted one that was
    in force then (a dose given under a hold and entered after its lift, D95)."""
    found = next((h for h in covering(state, patient_id, arm, kind)
                  if h.held_from is None or given_at is None or given_at >= h.held_from), None)
    if found is not None or given_at is None:
        return found
    return next((h for h, until in state.lifted if _covers(h, patient_id, arm, kind)
                 and (h.held_from is None or h.held_from <= given_at) and given_at < until), None)
