"""Pure randomization domain: the patient's life cycle, the allocation, safety holds. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MappingProxyType

from services.randomization.allocation import Generator, minimize, slot_arm
from services.randomization.eligibility import (  # re-exported: the domain's vocabulary
    ScreeningFacts,
    age_on,
    eligibility,
    months_before,
)
from shared import decider
from shared.events import (
    AllocationSlotUsed,
    Arm,
    ArmAssigned,
    ArmCrossedOver,
    ArmSuspended,
    EnrollmentPaused,
    EventData,
    PatientEnrolled,
    PatientScreened,
    PatientWithdrawn,
    RandomizationHoldApplied,
    RandomizationHoldLifted,
    SafetyHoldLifted,
    TrialHalted,
)
from shared.protocol import ProtocolConfig
from shared.web import Problem

__all__ = ["ScreeningFacts", "age_on", "eligibility", "months_before"]

# --- the patient ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patient:
    """A patient's state, folded from its stream."""

    patient_id: str | None = None
    site_id: str | None = None
    status: str = "new"  # new, enrolled, randomized, withdrawn
    baseline_weight_kg: float = 0.0
    baseline_pasi: float = 0.0
    assignment: ArmAssigned | None = None
    arm: Arm | None = None  # the current arm: the assigned one until a crossover
    crossovers: tuple[ArmCrossedOver, ...] = ()


def evolve(state: Patient, event: EventData) -> Patient:
    match event:
        case PatientEnrolled():
            return Patient(event.patient_id, event.site_id, "enrolled",
                           event.baseline_weight_kg, event.baseline_pasi)
        case ArmAssigned():
            return replace(state, status="randomized", assignment=event, arm=event.arm)
        case ArmCrossedOver():
            return replace(state, arm=event.to_arm, crossovers=(*state.crossovers, event))
        case PatientWithdrawn():
            return replace(state, status="withdrawn")
    return state


def fold(events: list[EventData]) -> Patient:
    return decider.fold(evolve, Patient(), events)


def decide_enrol(screening: PatientScreened | None, patient: Patient, patient_id: str,
                 enrolled_at: datetime) -> PatientEnrolled:
    if screening is None:
        raise Problem(404, "screening_not_found", "No such screening")
    if not screening.eligible:
        raise Problem(422, "not_eligible", "The screening found the patient not eligible",
                      reasons=[r.model_dump() for r in screening.reasons])
    if patient.status != "new":
        raise Problem(409, "already_enrolled", "This screening was enrolled already",
                      patient_id=patient.patient_id)
    return PatientEnrolled(
        patient_id=patient_id, site_id=screening.site_id, screening_id=screening.screening_id,
        baseline_weight_kg=screening.weight_kg, baseline_pasi=screening.pasi,
        enrolled_at=enrolled_at)


def decide_withdraw(patient: Patient, reason: str, at: datetime) -> PatientWithdrawn:
    if patient.status == "withdrawn":
        raise Problem(409, "withdrawn", "The patient has withdrawn already")
    return PatientWithdrawn(patient_id=patient.patient_id or "", site_id=patient.site_id or "",
                            reason=reason, withdrawn_at=at)


# --- strata -----------------------------------------------------------------------------------


def pasi_band(baseline_pasi: float, protocol: ProtocolConfig) -> str:
    return "pasi_ge20" if baseline_pasi >= protocol.pasi_band_threshold else "pasi_lt20"


def stratum_of(patient: Patient, protocol: ProtocolConfig) -> str:
    return f"{patient.site_id}:{pasi_band(patient.baseline_pasi, protocol)}"


def factor_levels(site_id: str, band: str) -> tuple[str, ...]:
    """Minimization's factors: the patient's site and PASI band."""
    return (f"site={site_id}", f"pasi={band}")


# --- the allocation (stream `allocation`: one AllocationSlotUsed per assignment) ---------------


@dataclass(frozen=True)
class Allocation:
    assigned: int = 0  # randomizations so far, trial-wide: the next number is this + 1
    slots: MappingProxyType[str, int] = field(default_factory=lambda: MappingProxyType({}))
    counts: MappingProxyType[str, MappingProxyType[Arm, int]] = field(
        default_factory=lambda: MappingProxyType({}))


def evolve_allocation(state: Allocation, event: EventData) -> Allocation:
    if not isinstance(event, AllocationSlotUsed):
        return state
    counts = dict(state.counts)
    for level in factor_levels(event.site_id, event.pasi_band):
        per_arm = dict(counts.get(level, {}))
        per_arm[event.arm] = per_arm.get(event.arm, 0) + 1
        counts[level] = MappingProxyType(per_arm)
    return Allocation(
        assigned=event.randomization_number,
        slots=MappingProxyType({**state.slots, event.stratum: event.stratum_slot}),
        counts=MappingProxyType(counts))


def fold_allocation(events: list[EventData]) -> Allocation:
    return decider.fold(evolve_allocation, Allocation(), events)


# --- safety holds (stream `safety-holds`) ------------------------------------------------------


@dataclass(frozen=True)
class Holds:
    applied: tuple[RandomizationHoldApplied, ...] = ()
    lifted: frozenset[str] = frozenset()

    def in_force(self, kind: str, target: str | None = None) -> RandomizationHoldApplied | None:
        for hold in self.applied:
            if (hold.kind == kind and hold.hold_id not in self.lifted
                    and (target is None or hold.target == target)):
                return hold
        return None


def evolve_holds(state: Holds, event: EventData) -> Holds:
    match event:
        case RandomizationHoldApplied():
            return replace(state, applied=(*state.applied, event))
        case RandomizationHoldLifted():
            # A lift names exactly one hold; it may even arrive first, and still counts.
            return replace(state, lifted=state.lifted | {event.hold_id})
    return state


def fold_holds(events: list[EventData]) -> Holds:
    return decider.fold(evolve_holds, Holds(), events)


def refuse_if_held(holds: Holds, arm: Arm | None = None) -> None:
    """409 while the trial is halted or enrolment paused, or when `arm` is suspended."""
    if hold := holds.in_force("trial_halted"):
        raise Problem(409, "trial_halted", "The trial is halted", rule_id=hold.rule_id)
    if hold := holds.in_force("enrollment_paused"):
        raise Problem(409, "enrollment_paused", "Enrolment is paused", rule_id=hold.rule_id)
    if arm is not None and (hold := holds.in_force("arm_suspended", arm)):
        raise Problem(409, "arm_suspended", "Randomization into this slot's arm is suspended",
                      rule_id=hold.rule_id)


# --- randomization ----------------------------------------------------------------------------


def next_arm(patient: Patient, allocation: Allocation, protocol: ProtocolConfig,
             secret: bytes) -> Arm:
    """The arm the next assignment of this patient's stratum would get; never leaves the service."""
    config = protocol.randomization
    if config.method == "minimization":
        band = pasi_band(patient.baseline_pasi, protocol)
        # Keyed by the randomization number: fixed by the secret and the history, like blocks.
        rng = Generator(secret, f"minimization|{allocation.assigned + 1}")
        return minimize(allocation.counts, factor_levels(patient.site_id or "", band),
                        config.minimization, rng)
    stratum = stratum_of(patient, protocol)
    return slot_arm(secret, config, stratum, allocation.slots.get(stratum, 0) + 1)


def decide_randomize(patient: Patient, allocation: Allocation, holds: Holds,
                     protocol: ProtocolConfig, secret: bytes, at: datetime
                     ) -> tuple[ArmAssigned, AllocationSlotUsed]:
    """Assign the next slot of the patient's stratum, or refuse without using it up."""
    if patient.status == "withdrawn":
        raise Problem(409, "withdrawn", "The patient has withdrawn")
    if patient.assignment is not None:
        raise Problem(409, "already_randomized", "The patient is randomized already")
    if patient.status != "enrolled" or patient.patient_id is None or patient.site_id is None:
        raise Problem(404, "patient_not_found", "No such patient")
    refuse_if_held(holds)
    if allocation.assigned >= protocol.enrollment_cap:
        raise Problem(409, "enrollment_closed", "The enrolment cap is reached",
                      cap=protocol.enrollment_cap)
    arm = next_arm(patient, allocation, protocol, secret)
    refuse_if_held(holds, arm)
    stratum = stratum_of(patient, protocol)
    number = allocation.assigned + 1
    assigned = ArmAssigned(
        patient_id=patient.patient_id, site_id=patient.site_id, arm=arm,
        randomization_number=number, stratum=stratum,
        baseline_weight_kg=patient.baseline_weight_kg, assigned_at=at)
    used = AllocationSlotUsed(
        randomization_number=number, stratum=stratum,
        stratum_slot=allocation.slots.get(stratum, 0) + 1, patient_id=patient.patient_id,
        site_id=patient.site_id, pasi_band=pasi_band(patient.baseline_pasi, protocol), arm=arm,
        method=protocol.randomization.method)
    return assigned, used


# --- crossover --------------------------------------------------------------------------------


def decide_crossover(patient: Patient, to_arm: Arm, reason: str, holds: Holds,
                     protocol: ProtocolConfig, at: datetime) -> ArmCrossedOver:
    rules = protocol.randomization.crossover
    if not rules.enabled:
        raise Problem(409, "crossover_disabled", "The protocol does not allow crossover")
    if patient.status == "withdrawn":
        raise Problem(409, "withdrawn", "The patient has withdrawn")
    if patient.assignment is None or patient.arm is None:
        raise Problem(409, "not_randomized", "The patient is not randomized")
    if len(patient.crossovers) >= rules.max_crossovers_per_patient:
        raise Problem(409, "already_crossed_over", "The patient has crossed over already")
    if patient.arm not in rules.from_arms or to_arm not in rules.to_arms or to_arm == patient.arm:
        raise Problem(422, "crossover_not_allowed",
                      f"The protocol allows crossover from {', '.join(rules.from_arms)} "
                      f"to {', '.join(rules.to_arms)} only",
                      from_arm=patient.arm, to_arm=to_arm)
    earliest = patient.assignment.assigned_at + timedelta(weeks=rules.min_weeks_since_assignment)
    if at < earliest:
        raise Problem(409, "crossover_too_early",
                      f"Crossover is allowed from week {rules.min_weeks_since_assignment} "
                      "after assignment", earliest=earliest.isoformat())
    refuse_if_held(holds, to_arm)
    return ArmCrossedOver(patient_id=patient.patient_id or "", site_id=patient.site_id or "",
                          from_arm=patient.arm, to_arm=to_arm, reason=reason, crossed_over_at=at)



def hold_from_safety(event: EventData) -> RandomizationHoldApplied | RandomizationHoldLifted | None:
    """What a trial.safety event means for randomization (a patient's dosing hold: nothing)."""
    match event:
        case EnrollmentPaused():
            return RandomizationHoldApplied(hold_id=event.hold_id, kind="enrollment_paused",
                                            scope="trial", target=event.trial_id,
                                            rule_id=event.rule_id)
        case TrialHalted():
            return RandomizationHoldApplied(hold_id=event.hold_id, kind="trial_halted",
                                            scope="trial", target=event.trial_id,
                                            rule_id=event.rule_id)
        case ArmSuspended():
            return RandomizationHoldApplied(hold_id=event.hold_id, kind="arm_suspended",
                                            scope="arm", target=event.arm, rule_id=event.rule_id)
        case SafetyHoldLifted() if event.scope != "patient":
            return RandomizationHoldLifted(hold_id=event.hold_id, scope=event.scope,
                                           target=event.target)
    return None
