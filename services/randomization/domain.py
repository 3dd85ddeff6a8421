"""Pure randomization domain: screenings, the patient's life cycle, the allocation, safety holds.

Four aggregates in the decider shape (shared/decider.py), each its own stream: a screening, a
patient, the trial's allocation (evolved by the slots patients' randomizations use), and the
randomization holds (from trial.safety). No I/O: a refusal is a `Refused`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from types import MappingProxyType

from services.randomization.allocation import Generator, minimize, sequence_id, slot_arm
from services.randomization.eligibility import (  # re-exported: the domain's vocabulary
    ScreeningFacts,
    age_on,
    eligibility,
    months_before,
)
from shared import decider
from shared.decider import Decider
from shared.errors import Refused
from shared.events import (
    ARMS,
    AllocationSlotUsed,
    Arm,
    ArmAssigned,
    ArmCrossedOver,
    ArmSuspended,
    DeathRecorded,
    Disposition,
    EnrollmentPaused,
    EventData,
    LostToFollowUp,
    PatientDispositionNoted,
    PatientEnrolled,
    PatientScreened,
    PatientWithdrawn,
    RandomizationHoldApplied,
    RandomizationHoldLifted,
    RandomizationRecordResolved,
    RandomizationRecordUnapplied,
    SafetyHoldLifted,
    StudyCompleted,
    TreatmentDiscontinued,
    TrialHalted,
)
from shared.protocol import ProtocolConfig

__all__ = ["ScreeningFacts", "age_on", "eligibility", "months_before"]


# --- a screening (stream `screening-<id>`) ----------------------------------------------------


@dataclass(frozen=True)
class Screen:
    screening_id: str
    facts: ScreeningFacts
    at: datetime


def evolve_screening(state: PatientScreened | None, event: EventData) -> PatientScreened | None:
    return event if isinstance(event, PatientScreened) else state


def impossible_dates(facts: ScreeningFacts, today: date) -> list[dict[str, str]]:
    """Dates no real screening can have on the site's `today`: bad input, not ineligibility."""
    errors = []
    if facts.birth_date > today:
        errors.append(("birth_date", "is in the future"))
    if facts.diagnosis_date > today:
        errors.append(("diagnosis_date", "is in the future"))
    if facts.diagnosis_date < facts.birth_date:
        errors.append(("diagnosis_date", "is before the birth date"))
    return [{"field": f, "message": m, "type": "value_error"} for f, m in errors]


def decide_screen(state: PatientScreened | None, command: Screen,
                  protocol: ProtocolConfig) -> list[EventData]:
    """Every eligibility criterion checked on the site's own date of the screening (ages too),
    every failing one reported; screened either way."""
    facts = command.facts
    today = protocol.site_date(facts.site_id, command.at)
    if errors := impossible_dates(facts, today):
        raise Refused("validation_error", "Request is not valid", errors=errors)
    reasons = eligibility(facts, today, protocol.eligibility)
    return [PatientScreened(
        screening_id=command.screening_id, site_id=facts.site_id,
        screening_number=facts.screening_number, eligible=not reasons, reasons=tuple(reasons),
        age_years=age_on(facts.birth_date, today), weight_kg=facts.weight_kg, pasi=facts.pasi,
        protocol_version=protocol.version, screened_at=command.at, screened_on=today,
        consent_signed_at=facts.consent_signed_at, bsa_percent=facts.bsa_percent,
        dlqi=facts.dlqi, sex=facts.sex)]


def screenings(protocol: ProtocolConfig) -> Decider[PatientScreened | None, Screen, EventData]:
    return Decider(None, evolve_screening, lambda state, c: decide_screen(state, c, protocol))

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
    dispositions: tuple[PatientDispositionNoted, ...] = ()  # from trial.efficacy


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
        case PatientDispositionNoted():
            return replace(state, dispositions=(*state.dispositions, event))
    return state


def decide_disposition(patient: Patient, event: EventData, event_id: str) -> list[EventData]:
    """A disposition efficacy recorded (trial.efficacy), noted once so GET shows it."""
    if patient.patient_id is None or patient.site_id is None:
        return []
    found: tuple[Disposition, datetime, str | None]
    match event:
        case TreatmentDiscontinued():
            found = ("treatment_discontinued", event.discontinued_at, event.reason)
        case LostToFollowUp():
            found = ("lost_to_follow_up", event.at, event.reason)
        case DeathRecorded():
            found = ("died", event.reported_at, None)
        case StudyCompleted():
            found = ("completed", event.completed_at, None)
        case _:
            return []
    if any(d.disposition == found[0] for d in patient.dispositions):
        return []
    return [PatientDispositionNoted(patient_id=patient.patient_id, site_id=patient.site_id,
                                    disposition=found[0], at=found[1], reason=found[2],
                                    source_event_id=event_id)]


def fold(events: list[EventData]) -> Patient:
    return decider.fold(evolve, Patient(), events)


def decide_enrol(screening: PatientScreened | None, patient: Patient, patient_id: str,
                 enrolled_at: datetime) -> list[EventData]:
    if screening is None:
        raise Refused("screening_not_found", "No such screening")
    if not screening.eligible:
        raise Refused("not_eligible", "The screening found the patient not eligible",
                      reasons=[r.model_dump() for r in screening.reasons])
    if patient.status != "new":
        raise Refused("already_enrolled", "This screening was enrolled already",
                      patient_id=patient.patient_id)
    return [PatientEnrolled(
        patient_id=patient_id, site_id=screening.site_id, screening_id=screening.screening_id,
        baseline_weight_kg=screening.weight_kg, baseline_pasi=screening.pasi,
        enrolled_at=enrolled_at, baseline_bsa_percent=screening.bsa_percent,
        baseline_dlqi=screening.dlqi)]


def decide_withdraw(patient: Patient, reason: str, at: datetime) -> list[EventData]:
    if patient.status == "withdrawn":
        raise Refused("withdrawn", "The patient has withdrawn already")
    return [PatientWithdrawn(patient_id=patient.patient_id or "", site_id=patient.site_id or "",
                             reason=reason, withdrawn_at=at)]


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
    # Slots used per sequence: a stratum's own, or its sequence over the open arms.
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
        slots=MappingProxyType({**state.slots,
                                event.sequence or event.stratum: event.stratum_slot}),
        counts=MappingProxyType(counts))


def fold_allocation(events: list[EventData]) -> Allocation:
    return ALLOCATION.fold(events)


# Nothing commands the allocation itself: a patient's randomization decides the slot it uses.
ALLOCATION: Decider[Allocation, object, EventData] = Decider(
    Allocation(), evolve_allocation, decider.no_commands)


# --- safety holds (stream `safety-holds`) ------------------------------------------------------


@dataclass(frozen=True)
class Holds:
    """Holds from trial.safety, and the records of it randomization could not apply (D32)."""

    applied: tuple[RandomizationHoldApplied, ...] = ()
    lifted: frozenset[str] = frozenset()
    unapplied: MappingProxyType[str, RandomizationRecordUnapplied] = field(
        default_factory=lambda: MappingProxyType({}))

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
        case RandomizationRecordUnapplied():
            return replace(state, unapplied=MappingProxyType(
                {**state.unapplied, event.record_id: event}))
        case RandomizationRecordResolved():
            return replace(state, unapplied=MappingProxyType(
                {k: v for k, v in state.unapplied.items() if k != event.record_id}))
    return state


def fold_holds(events: list[EventData]) -> Holds:
    return HOLDS.fold(events)


def decide_holds(state: Holds, event: EventData) -> list[EventData]:
    """What a trial.safety event means for randomization: a pause, halt or arm suspension holds
    new randomizations; a lift of one of those lifts it; anything else (a patient's dosing
    hold) changes nothing here. The same hold twice is one hold."""
    match event:
        case EnrollmentPaused() | TrialHalted() | ArmSuspended():
            if any(h.hold_id == event.hold_id for h in state.applied):
                return []
            kind = {"EnrollmentPaused": "enrollment_paused", "TrialHalted": "trial_halted",
                    "ArmSuspended": "arm_suspended"}[event.event_type()]
            return [RandomizationHoldApplied.model_validate({
                "hold_id": event.hold_id, "kind": kind, "scope": event.scope,
                "target": event.target, "rule_id": event.rule_id})]
        case SafetyHoldLifted() if event.scope != "patient":
            return [RandomizationHoldLifted(hold_id=event.hold_id, scope=event.scope,
                                            target=event.target)]
    return []


# Commanded by trial.safety's events, each taken as it comes.
HOLDS: Decider[Holds, EventData, EventData] = Decider(Holds(), evolve_holds, decide_holds)


def refuse_if_held(holds: Holds, arm: Arm | None = None) -> None:
    """Refused while the trial is halted or enrolment paused, or when `arm` is suspended."""
    if hold := holds.in_force("trial_halted"):
        raise Refused("trial_halted", "The trial is halted", rule_id=hold.rule_id)
    if hold := holds.in_force("enrollment_paused"):
        raise Refused("enrollment_paused", "Enrolment is paused", rule_id=hold.rule_id)
    if arm is not None and (hold := holds.in_force("arm_suspended", arm)):
        raise Refused("arm_suspended", "The arm is suspended", rule_id=hold.rule_id)
    # A safety record it could not apply may be a halt or a pause: it cannot tell, so it
    # refuses (fails closed) until an operator resolves it; one naming an arm only closes that
    # arm (`open_arms`).
    for unapplied in holds.unapplied.values():
        if unapplied.scope != "arm" or unapplied.target == arm:
            raise Refused("safety_record_unapplied", "A safety record that may concern this "
                          "randomization could not be applied; it waits for an operator",
                          record_id=unapplied.record_id, scope=unapplied.scope,
                          target=unapplied.target)


def open_arms(holds: Holds) -> tuple[Arm, ...]:
    """The arms no safety hold suspends (nor an unapplied record names), in the trial's order."""
    unsure = {u.target for u in holds.unapplied.values() if u.scope == "arm"}
    return tuple(a for a in ARMS if holds.in_force("arm_suspended", a) is None
                 and a not in unsure)


# --- randomization ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Draw:
    arm: Arm
    sequence: str | None  # None: the stratum's own sequence
    slot: int             # the slot's number within that sequence


def next_arm(patient: Patient, allocation: Allocation, protocol: ProtocolConfig, secret: bytes,
             arms: tuple[Arm, ...] = ARMS) -> Draw:
    """The arm this patient gets among the open `arms`; never leaves the service.

    Permuted blocks: the next slot of the stratum's own sequence, or, while an arm is
    suspended, of the stratum's sequence over the open arms, drawn independently from the secret
    (D30). Nothing is passed over or refused, so no answer tells which arm the stratum's own next
    slot holds, and when the arm resumes its sequence goes on where it stopped.
    """
    config = protocol.randomization
    stratum = stratum_of(patient, protocol)
    key = sequence_id(stratum, arms)
    slot = allocation.slots.get(key, 0) + 1
    sequence = None if arms == ARMS else key
    if config.method == "minimization":
        band = pasi_band(patient.baseline_pasi, protocol)
        # Keyed by the randomization number: fixed by the secret and the history, like blocks.
        rng = Generator(secret, f"minimization|{allocation.assigned + 1}")
        return Draw(minimize(allocation.counts, factor_levels(patient.site_id or "", band),
                             config.minimization, rng, arms), sequence, slot)
    return Draw(slot_arm(secret, config, stratum, slot, arms), sequence, slot)


def decide_randomize(patient: Patient, allocation: Allocation, holds: Holds,
                     protocol: ProtocolConfig, secret: bytes, at: datetime) -> list[EventData]:
    """Assign the next slot of the patient's stratum, or refuse without using it up."""
    if patient.status == "withdrawn":
        raise Refused("withdrawn", "The patient has withdrawn")
    if patient.assignment is not None:
        raise Refused("already_randomized", "The patient is randomized already")
    if patient.status != "enrolled" or patient.patient_id is None or patient.site_id is None:
        raise Refused("patient_not_found", "No such patient")
    refuse_if_held(holds)
    if allocation.assigned >= protocol.enrollment_cap:
        raise Refused("enrollment_closed", "The enrolment cap is reached",
                      cap=protocol.enrollment_cap)
    arms = open_arms(holds)
    if not arms:
        raise Refused("arm_suspended", "Every arm is suspended")
    draw = next_arm(patient, allocation, protocol, secret, arms)
    stratum = stratum_of(patient, protocol)
    number = allocation.assigned + 1
    assigned = ArmAssigned(
        patient_id=patient.patient_id, site_id=patient.site_id, arm=draw.arm,
        randomization_number=number, stratum=stratum,
        baseline_weight_kg=patient.baseline_weight_kg, assigned_at=at)
    used = AllocationSlotUsed(
        randomization_number=number, stratum=stratum, stratum_slot=draw.slot,
        patient_id=patient.patient_id, site_id=patient.site_id,
        pasi_band=pasi_band(patient.baseline_pasi, protocol), arm=draw.arm,
        method=protocol.randomization.method, sequence=draw.sequence)
    return [assigned, used]


# --- crossover --------------------------------------------------------------------------------


def decide_crossover(patient: Patient, to_arm: Arm, reason: str, holds: Holds,
                     protocol: ProtocolConfig, at: datetime) -> list[EventData]:
    rules = protocol.randomization.crossover
    if not rules.enabled:
        raise Refused("crossover_disabled", "The protocol does not allow crossover")
    if patient.status == "withdrawn":
        raise Refused("withdrawn", "The patient has withdrawn")
    if patient.assignment is None or patient.arm is None:
        raise Refused("not_randomized", "The patient is not randomized")
    if len(patient.crossovers) >= rules.max_crossovers_per_patient:
        raise Refused("already_crossed_over", "The patient has crossed over already")
    if patient.arm not in rules.from_arms or to_arm not in rules.to_arms or to_arm == patient.arm:
        raise Refused("crossover_not_allowed",
                      f"The protocol allows crossover from {', '.join(rules.from_arms)} "
                      f"to {', '.join(rules.to_arms)} only",
                      from_arm=patient.arm, to_arm=to_arm)
    earliest = patient.assignment.assigned_at + timedelta(weeks=rules.min_weeks_since_assignment)
    if at < earliest:
        raise Refused("crossover_too_early",
                      f"Crossover is allowed from week {rules.min_weeks_since_assignment} "
                      "after assignment", earliest=earliest.isoformat())
    refuse_if_held(holds, to_arm)
    return [ArmCrossedOver(patient_id=patient.patient_id or "", site_id=patient.site_id or "",
                           from_arm=patient.arm, to_arm=to_arm, reason=reason,
                           crossed_over_at=at)]


# --- the patient's commands -------------------------------------------------------------------


@dataclass(frozen=True)
class Enrol:
    patient_id: str
    screening: PatientScreened | None  # None: no such screening (or another site's)
    at: datetime


@dataclass(frozen=True)
class Randomize:
    """The decision reads the trial's allocation, the holds and the sequence's secret as well as
    the patient: the command carries them, so no randomization can be decided without them."""

    allocation: Allocation
    holds: Holds
    secret: bytes = field(repr=False)
    at: datetime


@dataclass(frozen=True)
class Withdraw:
    reason: str
    at: datetime


@dataclass(frozen=True)
class CrossOver:
    to_arm: Arm
    reason: str
    holds: Holds
    at: datetime


@dataclass(frozen=True)
class NoteDisposition:
    """A disposition efficacy recorded on trial.efficacy."""

    event: EventData
    event_id: str


PatientCommand = Enrol | Randomize | Withdraw | CrossOver | NoteDisposition


def patients(protocol: ProtocolConfig) -> Decider[Patient, PatientCommand, EventData]:
    """The patient aggregate under this protocol version. Randomize also decides the allocation
    slot it uses (`AllocationSlotUsed`, an event of the allocation's stream)."""

    def decide(state: Patient, command: PatientCommand) -> list[EventData]:
        match command:
            case Enrol():
                return decide_enrol(command.screening, state, command.patient_id, command.at)
            case Randomize():
                return decide_randomize(state, command.allocation, command.holds, protocol,
                                        command.secret, command.at)
            case Withdraw():
                return decide_withdraw(state, command.reason, command.at)
            case CrossOver():
                return decide_crossover(state, command.to_arm, command.reason, command.holds,
                                        protocol, command.at)
            case NoteDisposition():
                return decide_disposition(state, command.event, command.event_id)

    return Decider(Patient(), evolve, decide)


