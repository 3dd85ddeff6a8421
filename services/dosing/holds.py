"""Pure safety holds: which holds are in force, what a safety event changes, whom a hold stops."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from shared.decider import Decider
from shared.events import (
    ArmSuspended,
    DosingHeld,
    DosingResumed,
    EventData,
    PatientDosingHeld,
    SafetyHoldLifted,
    TrialHalted,
)

HOLDS_STREAM = "holds"
DoseKind = Literal["infusion", "methotrexate"]


@dataclass(frozen=True)
class Holds:
    """Holds in force by hold id, and every hold id ever seen (a lifted hold never returns)."""

    active: dict[str, DosingHeld] = field(default_factory=dict)
    seen: frozenset[str] = frozenset()


def evolve(state: Holds, event: EventData) -> Holds:
    match event:
        case DosingHeld():
            return Holds({**state.active, event.hold_id: event}, state.seen | {event.hold_id})
        case DosingResumed():
            active = {k: v for k, v in state.active.items() if k != event.hold_id}
            return replace(state, active=active)
    return state


def fold(events: Iterable[EventData]) -> Holds:
    return HOLDS.fold(events)


# The safety events that stop or restart dosing (an enrolment pause does not stop dosing).
SafetyEvent = PatientDosingHeld | ArmSuspended | TrialHalted | SafetyHoldLifted


def decide(state: Holds, event: SafetyEvent) -> list[EventData]:
    """A safety hold becomes a dosing hold; a lift resumes exactly the hold it names."""
    match event:
        case SafetyHoldLifted():
            held = state.active.get(event.hold_id)
            if held is None:
                return []  # not in force (never seen, or lifted already): nothing to resume
            return [DosingResumed(scope=held.scope, target=held.target, rule_id=held.rule_id,
                                  hold_id=held.hold_id, product=held.product)]
        case PatientDosingHeld() | ArmSuspended() | TrialHalted() if event.hold_id not in state.seen:
            product = event.product if isinstance(event, PatientDosingHeld) else "any"
            return [DosingHeld(scope=event.scope, target=event.target, rule_id=event.rule_id,
                               hold_id=event.hold_id, product=product)]
    return []


# Commanded by trial.safety's events, each taken as it comes.
HOLDS: Decider[Holds, SafetyEvent, EventData] = Decider(Holds(), evolve, decide)


def applying_to(state: Holds, patient_id: str, arm: str) -> list[DosingHeld]:
    """The holds in force over this patient: its own, its arm's, the trial's."""
    return [h for h in state.active.values()
            if h.scope == "trial" or (h.scope == "arm" and h.target == arm)
            or (h.scope == "patient" and h.target == patient_id)]


def blocking(state: Holds, patient_id: str, arm: str, kind: DoseKind) -> DosingHeld | None:
    """The first hold in force that stops this dose, if any."""
    return next((h for h in applying_to(state, patient_id, arm) if h.product in ("any", kind)),
                None)
