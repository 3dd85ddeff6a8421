"""Pure safety decisions: adverse event and lab intake, follow-ups, DSMB decisions, status. No I/O.

One aggregate in the decider shape (`safety(protocol)`): everything the safety service knows,
folded from its store (services/safety/state.py), commanded by reports, lab results, DSMB
decisions and the enrolment and dosing facts the rules need. Each decision returns its events
and every rule firing they cause, evaluated once, where they are made (services/safety/rules.py).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from fractions import Fraction

from services.safety import rules
from services.safety.rules import Emitted
from services.safety.state import Hold, PatientFile, SafetyState, evolve, fold
from shared.decider import Decider, Identified
from shared.errors import Refused
from shared.events import (
    ARMS,
    AdverseEventFollowedUp,
    AdverseEventReported,
    ArmAssigned,
    ArmCrossedOver,
    EventData,
    InfusionGiven,
    LabResult,
    LabResultReported,
    MethotrexateDoseGiven,
    PatientEnrolled,
    PatientSafetyFactRecorded,
    PatientWithdrawn,
    SafetyHoldLifted,
)
from shared.protocol import ProtocolConfig
from shared.protocol.safety import SafetyConfig

FACT_NS = uuid.UUID("9a3f6c1e-2b7d-4e58-8c09-4d1e6f2a7b30")
# Units accepted per analyte; cell counts in 10^9/L (10^3/uL is the same number).
LAB_UNITS = {"ALT": {"U/L", "IU/L"}, "AST": {"U/L", "IU/L"},
             "WBC": {"10^9/L", "10^3/uL"}, "neutrophils": {"10^9/L", "10^3/uL"},
             "platelets": {"10^9/L", "10^3/uL"}}
CLOCK_SKEW = timedelta(minutes=5)


def apply(state: SafetyState, emitted: list[Emitted]) -> SafetyState:
    return fold(state.trial_id, emitted, state)


def with_consequences(config: SafetyConfig, state: SafetyState,
                      emitted: list[Emitted]) -> list[Emitted]:
    """The new events, then every rule firing they cause: evaluated once, where they are made."""
    return emitted + rules.evaluate(config, apply(state, emitted))


def known_patient(state: SafetyState, patient_id: str) -> PatientFile:
    patient = state.patients.get(patient_id)
    if patient is None:
        raise Refused("patient_not_found", "No such patient")
    return patient


# --- facts from enrolment and dosing ----------------------------------------------------------


def fact_from(event_id: str, event: EventData) -> PatientSafetyFactRecorded | None:
    """The part of a consumed enrolment or dosing event that the rules need, or None."""
    match event:
        case PatientEnrolled():
            return PatientSafetyFactRecorded(patient_id=event.patient_id, site_id=event.site_id,
                                             fact="enrolled", at=event.enrolled_at,
                                             source_event_id=event_id)
        case ArmAssigned():
            return PatientSafetyFactRecorded(patient_id=event.patient_id, site_id=event.site_id,
                                             fact="assigned", arm=event.arm,
                                             at=event.assigned_at, source_event_id=event_id)
        case ArmCrossedOver():  # randomization's, when the protocol enables crossover
            return PatientSafetyFactRecorded(patient_id=event.patient_id, site_id=event.site_id,
                                             fact="crossed_over", arm=event.to_arm,
                                             at=event.crossed_over_at, source_event_id=event_id)
        case PatientWithdrawn():
            return PatientSafetyFactRecorded(patient_id=event.patient_id, site_id=event.site_id,
                                             fact="withdrawn", at=event.withdrawn_at,
                                             source_event_id=event_id)
        case InfusionGiven():
            return PatientSafetyFactRecorded(patient_id=event.patient_id, site_id=event.site_id,
                                             fact="infusion", arm=event.arm, at=event.given_at,
                                             source_event_id=event_id)
        case MethotrexateDoseGiven():
            return PatientSafetyFactRecorded(patient_id=event.patient_id, site_id=event.site_id,
                                             fact="methotrexate", arm="mtx", at=event.given_at,
                                             source_event_id=event_id)
    return None


def fact_event_id(source_event_id: str) -> str:
    """One fact per source event, however often the source is delivered."""
    return str(uuid.uuid5(FACT_NS, source_event_id))


def decide_fact(config: SafetyConfig, state: SafetyState, source_event_id: str,
                event: EventData) -> list[Emitted]:
    fact = fact_from(source_event_id, event)
    if fact is None:
        return []
    return with_consequences(config, state, [Identified(fact_event_id(source_event_id), fact)])


# --- adverse events and labs ------------------------------------------------------------------


@dataclass(frozen=True)
class ReportAdverseEvent:
    patient_id: str
    term: str
    onset_at: datetime
    ctcae_grade: int
    serious: bool
    relatedness: str
    expected: bool
    infusion_related: bool | None = None
    outcome: str | None = None


def infusion_related(config: SafetyConfig, patient: PatientFile, onset: datetime) -> bool:
    """Onset within the configured hours after one of the patient's infusions."""
    window = timedelta(hours=config.infusion_related_hours)
    return any(timedelta(0) <= onset - given <= window for given in patient.infusions)


def decide_report(config: SafetyConfig, state: SafetyState, cmd: ReportAdverseEvent,
                  adverse_event_id: str, now: datetime) -> list[Emitted]:
    patient = known_patient(state, cmd.patient_id)
    if cmd.onset_at > now + CLOCK_SKEW:
        raise Refused("onset_in_future", "The onset lies in the future",
                      errors=[{"field": "body.onset_at", "message": "must not be in the future"}])
    derived = cmd.infusion_related
    if derived is None:
        derived = infusion_related(config, patient, cmd.onset_at)
    reported = AdverseEventReported.model_validate({
        "adverse_event_id": adverse_event_id, "patient_id": patient.patient_id,
        "site_id": patient.site_id, "arm": patient.arm, "term": cmd.term,
        "onset_at": cmd.onset_at, "ctcae_grade": cmd.ctcae_grade, "serious": cmd.serious,
        "relatedness": cmd.relatedness, "expected": cmd.expected, "infusion_related": derived,
        "reported_at": now, "outcome": cmd.outcome})
    return with_consequences(config, state, [Identified(str(uuid.uuid4()), reported)])


@dataclass(frozen=True)
class FollowUp:
    patient_id: str
    adverse_event_id: str
    ctcae_grade: int | None = None
    serious: bool | None = None
    relatedness: str | None = None
    expected: bool | None = None
    outcome: str | None = None
    resolved_at: datetime | None = None


def decide_follow_up(config: SafetyConfig, state: SafetyState, cmd: FollowUp, follow_up_id: str,
                     now: datetime) -> list[Emitted]:
    patient = known_patient(state, cmd.patient_id)
    ae = state.adverse_events.get(cmd.adverse_event_id)
    if ae is None or ae.patient_id != patient.patient_id:
        raise Refused("adverse_event_not_found", "No such adverse event for this patient")
    changes = {k: v for k, v in cmd.__dict__.items()
               if k not in ("patient_id", "adverse_event_id") and v is not None}
    if not changes:
        raise Refused("empty_follow_up", "A follow-up must report at least one change")
    if cmd.resolved_at is not None and cmd.resolved_at < ae.onset_at:
        raise Refused("resolved_before_onset", "The event cannot resolve before its onset",
                      errors=[{"field": "body.resolved_at", "message": "before the onset"}])
    event = AdverseEventFollowedUp.model_validate({
        "follow_up_id": follow_up_id, "adverse_event_id": ae.adverse_event_id,
        "patient_id": patient.patient_id, "site_id": patient.site_id, **changes,
        "reported_at": now})
    return with_consequences(config, state, [Identified(str(uuid.uuid4()), event)])


def decide_lab(config: SafetyConfig, state: SafetyState, patient_id: str, collected_at: datetime,
               results: tuple[LabResult, ...], lab_result_id: str, now: datetime) -> list[Emitted]:
    patient = known_patient(state, patient_id)
    errors = []
    for i, r in enumerate(results):
        if r.unit not in LAB_UNITS[r.analyte]:
            errors.append({"field": f"body.results.{i}.unit",
                           "message": f"{r.analyte} in one of {sorted(LAB_UNITS[r.analyte])}"})
        if r.analyte in ("ALT", "AST") and r.uln is None:
            errors.append({"field": f"body.results.{i}.uln",
                           "message": f"{r.analyte} needs its upper limit of normal"})
    if errors:
        raise Refused("validation_error", "Lab results are not valid", errors=errors)
    if collected_at > now + CLOCK_SKEW:
        raise Refused("collected_in_future", "The sample's collection lies in the future")
    event = LabResultReported.model_validate({
        "lab_result_id": lab_result_id, "patient_id": patient.patient_id,
        "site_id": patient.site_id, "arm": patient.arm, "collected_at": collected_at,
        "results": results, "reported_at": now})
    return with_consequences(config, state, [Identified(str(uuid.uuid4()), event)])


# --- DSMB decisions ---------------------------------------------------------------------------


def decide_lift(state: SafetyState, scope: str, target: str, hold_id: str | None,
                rationale: str, decided_by: str) -> list[Emitted]:
    """Lift exactly the named hold, or every hold in force on the scope's target."""
    holds = state.holds_on(scope, target)
    if hold_id is not None:
        holds = [h for h in holds if h.hold_id == hold_id]
        if not holds:
            raise Refused("hold_not_found", f"No hold {hold_id} in force on {scope} {target}")
    if not holds:
        raise Refused("no_active_hold", f"No hold is in force on {scope} {target}")
    return [Identified(str(uuid.uuid4()), SafetyHoldLifted(
        hold_id=h.hold_id, scope=h.scope, target=h.target, rationale=rationale,
        decided_by=decided_by)) for h in holds]


# --- status -----------------------------------------------------------------------------------


def status(config: SafetyConfig, state: SafetyState, enrollment_cap: int) -> dict[str, object]:
    """The trial's safety status. Lists are in a canonical order (not arrival order), so the same
    history gives the same status in any store, however the topic's partitions interleave."""
    holds = sorted(state.active_holds.values(), key=lambda h: (h.scope, h.target, h.rule_id,
                                                              h.hold_id))
    trial_holds = [h for h in holds if h.scope == "trial"]
    halted = any(h.kind == "TrialHalted" for h in trial_holds)
    randomized = sum(1 for p in state.patients.values() if p.arm is not None)
    enrollment = ("paused" if trial_holds else
                  "closed" if randomized >= enrollment_cap else "open")
    bayes = next((r.bayes for r in config.rules if r.bayes is not None), None)
    bayes_id = next((r.id for r in config.rules if r.bayes is not None), None)
    arms: dict[str, object] = {}
    for arm in ARMS:
        arm_holds = [h for h in holds if h.scope == "arm" and h.target == arm]
        view: dict[str, object] = {
            "status": "suspended" if arm_holds else "active",
            "patients_dosed": sum(1 for p in state.patients.values() if p.arm == arm and p.dosed),
            "holds": [_hold_view(h) for h in arm_holds]}
        if bayes is not None:
            tox = rules.arm_toxicity(config, bayes, state, arm)
            view.update(toxicities=tox.toxicities, posterior_n=tox.patients_dosed,
                        posterior_probability=round(float(tox.probability), 6),
                        posterior_rule=bayes_id,
                        posterior_threshold=bayes.probability, posterior_rate=bayes.rate,
                        posterior_exceeded=tox.probability > Fraction(str(bayes.probability)))
        arms[arm] = view
    return {
        "trial": {"trial_id": state.trial_id, "status": "halted" if halted else "active",
                  "enrollment": enrollment, "rule_set_version": config.rule_set_version,
                  "holds": [_hold_view(h) for h in trial_holds]},
        "arms": arms,
        "patient_holds": [{"patient_id": h.target, **_hold_view(h)}
                          for h in holds if h.scope == "patient"],
        "triggered_rules": [{"rule_id": f.rule_id, "rule_set_version": f.rule_set_version,
                             "scope": f.scope, "target": f.target, "at": f.at,
                             "evidence": list(f.evidence)}
                            for f in sorted(state.firings, key=lambda f: (
                                str(f.at), f.rule_id, f.target, f.evidence))],
        "susar_reports_due": [{"adverse_event_id": s.adverse_event_id, "patient_id": s.patient_id,
                               "days": s.days, "due_at": s.due_at}
                              for s in sorted(state.susars, key=lambda s: (s.due_at,
                                                                           s.adverse_event_id))],
    }


def _hold_view(h: Hold) -> dict[str, object]:
    return {"hold_id": h.hold_id, "kind": h.kind, "scope": h.scope, "target": h.target,
            "rule_id": h.rule_id, "product": h.product}


# --- the aggregate ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """An adverse event, under the id it gets, reported now."""

    adverse_event: ReportAdverseEvent
    adverse_event_id: str
    at: datetime


@dataclass(frozen=True)
class AddFollowUp:
    follow_up: FollowUp
    follow_up_id: str
    at: datetime


@dataclass(frozen=True)
class ReportLab:
    patient_id: str
    collected_at: datetime
    results: tuple[LabResult, ...]
    lab_result_id: str
    at: datetime


@dataclass(frozen=True)
class Lift:
    """A DSMB decision to resume: exactly one hold, or every hold on the scope's target."""

    scope: str
    target: str
    hold_id: str | None
    rationale: str
    decided_by: str


@dataclass(frozen=True)
class RecordFact:
    """An enrolment or dosing event, as consumed (its id names the fact it becomes)."""

    source_event_id: str
    event: EventData


SafetyCommand = Report | AddFollowUp | ReportLab | Lift | RecordFact


def safety(protocol: ProtocolConfig) -> Decider[SafetyState, SafetyCommand, Emitted]:
    """The safety aggregate under this protocol version's stopping rules."""
    config = protocol.safety

    def decide(state: SafetyState, command: SafetyCommand) -> list[Emitted]:
        match command:
            case Report():
                return decide_report(config, state, command.adverse_event,
                                     command.adverse_event_id, command.at)
            case AddFollowUp():
                return decide_follow_up(config, state, command.follow_up, command.follow_up_id,
                                        command.at)
            case ReportLab():
                return decide_lab(config, state, command.patient_id, command.collected_at,
                                  command.results, command.lab_result_id, command.at)
            case Lift():
                return decide_lift(state, command.scope, command.target, command.hold_id,
                                   command.rationale, command.decided_by)
            case RecordFact():
                return decide_fact(config, state, command.source_event_id, command.event)

    return Decider(SafetyState(protocol.trial_id), evolve, decide)
