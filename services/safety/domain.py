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
    ArmSuspended,
    EnrollmentPaused,
    EventData,
    InfusionGiven,
    LabResult,
    LabResultReported,
    MethotrexateDoseGiven,
    PatientDosingHeld,
    PatientEnrolled,
    PatientSafetyFactRecorded,
    PatientWithdrawn,
    SafetyHoldLifted,
    StoppingRuleTriggered,
    SusarReportDue,
    TrialHalted,
)
from shared.protocol import ProtocolConfig
from shared.protocol.safety import SafetyConfig

FACT_NS = uuid.UUID("9a3f6c1e-2b7d-4e58-8c09-4d1e6f2a7b30")
DSMB_NS = uuid.UUID("5d2c8e71-0f4a-4b9e-9c36-2e7a1b8d4f60")  # a DSMB hold's id, from its decision
# Units accepted per analyte; cell counts in 10^9/L (10^3/uL is the same number).
LAB_UNITS = {"ALT": {"U/L", "IU/L"}, "AST": {"U/L", "IU/L"},
             "WBC": {"10^9/L", "10^3/uL"}, "neutrophils": {"10^9/L", "10^3/uL"},
             "platelets": {"10^9/L", "10^3/uL"}}
CLOCK_SKEW = timedelta(minutes=5)


def apply(state: SafetyState, emitted: list[Emitted]) -> SafetyState:
    return fold(state.trial_id, emitted, state)


def with_consequences(config: SafetyConfig, state: SafetyState,
                      emitted: list[Emitted]) -> list[Emitted]:
    """The new events, then every rule firing they cause, then the reporting clocks they start:
    evaluated once, where they are made."""
    after = apply(state, emitted)
    fired = rules.evaluate(config, after)
    touched = {ae_id for _, e in emitted + fired
               if isinstance(ae_id := getattr(e, "adverse_event_id", None), str)}
    return emitted + fired + rules.clocks_due(config, apply(after, fired), touched)


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
    """Onset within the configured hours after one of the patient's infusions known now (one
    learnt of later makes it related then: rules.infusion_relation)."""
    return any(rules.within_infusion_window(config, onset, given) for given in patient.infusions)


def refuse_if_inconsistent(config: SafetyConfig, grade: int, serious: bool, outcome: str | None,
                           stored: str = "") -> None:
    """A fatal outcome means the death grade (CTCAE v5: grade 5) and serious (ICH E2A: an event
    resulting in death is serious); the death grade means serious, and an outcome, once known,
    of fatal. A contradiction is refused, naming each field at fault: a
    death recorded as grade 3 and not serious would pass every rule that reads grade or
    seriousness (R1's grade criterion, R5's SUSAR), and its reporting clock."""
    death = grade == config.death_grade
    if outcome != "fatal" and not death:
        return
    errors = []
    if outcome == "fatal" and not death:
        errors.append({"field": "body.ctcae_grade",
                       "message": f"must be {config.death_grade} for a fatal outcome "
                                  f"(the event is grade {grade}{stored})"})
    if death and outcome is not None and outcome != "fatal":
        errors.append({"field": "body.outcome",
                       "message": f"must be fatal (or not yet known) for grade "
                                  f"{config.death_grade}, death{stored}"})
    if not serious:
        errors.append({"field": "body.serious",
                       "message": f"must be true for a death{stored}"})
    if errors:
        raise Refused("inconsistent_adverse_event",
                      "A fatal outcome requires the death grade and a serious event",
                      errors=errors)


def decide_report(config: SafetyConfig, state: SafetyState, cmd: ReportAdverseEvent,
                  adverse_event_id: str, now: datetime) -> list[Emitted]:
    patient = known_patient(state, cmd.patient_id)
    if cmd.onset_at > now + CLOCK_SKEW:
        raise Refused("onset_in_future", "The onset lies in the future",
                      errors=[{"field": "body.onset_at", "message": "must not be in the future"}])
    refuse_if_inconsistent(config, cmd.ctcae_grade, cmd.serious, cmd.outcome)
    derived, source = cmd.infusion_related, "reporter"
    if derived is None:
        derived, source = infusion_related(config, patient, cmd.onset_at), "derived"
    reported = AdverseEventReported.model_validate({
        "adverse_event_id": adverse_event_id, "patient_id": patient.patient_id,
        "site_id": patient.site_id, "arm": patient.arm_at(cmd.onset_at), "term": cmd.term,
        "onset_at": cmd.onset_at, "ctcae_grade": cmd.ctcae_grade, "serious": cmd.serious,
        "relatedness": cmd.relatedness, "expected": cmd.expected, "infusion_related": derived,
        "reported_at": now, "outcome": cmd.outcome, "infusion_related_source": source})
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
    infusion_related: bool | None = None


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
    last = ae.current  # the event as it will stand after this follow-up
    refuse_if_inconsistent(
        config, last.grade if cmd.ctcae_grade is None else cmd.ctcae_grade,
        last.serious if cmd.serious is None else cmd.serious,
        last.outcome if cmd.outcome is None else cmd.outcome,
        stored=", as this follow-up leaves it")
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
        "site_id": patient.site_id, "arm": patient.arm_at(collected_at),
        "collected_at": collected_at,
        "results": results, "reported_at": now})
    return with_consequences(config, state, [Identified(str(uuid.uuid4()), event)])


# --- DSMB decisions ---------------------------------------------------------------------------


def decide_lift(state: SafetyState, scope: str, target: str, hold_id: str | None,
                rationale: str, decided_by: str) -> list[Emitted]:
    """Lift exactly the named hold, or every hold in force on the scope's target (scope
    `enrollment`: the trial's enrolment pauses only)."""
    if scope == "enrollment":
        holds = [h for h in state.holds_on("trial", target) if h.kind == "EnrollmentPaused"]
    else:
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


@dataclass(frozen=True)
class Impose:
    """A DSMB decision to hold a patient's dosing, an arm, enrolment or the whole trial."""

    scope: str  # patient, arm, enrollment, trial
    target: str
    rationale: str
    decided_by: str
    decision_id: str
    product: str = "any"  # a patient's hold: which dosing


def decide_hold(config: SafetyConfig, state: SafetyState, cmd: Impose) -> list[Emitted]:
    """The hold the DSMB imposes: the event a stopping rule's action would be, under the DSMB's
    rule id and naming the decision, so dosing and randomization enforce it and a DSMB lift
    lifts it like any other."""
    if cmd.scope == "patient":
        known_patient(state, cmd.target)
    elif cmd.scope == "arm" and cmd.target not in ARMS:
        raise Refused("hold_target_not_found", f"No arm {cmd.target} in this trial")
    elif cmd.scope in ("enrollment", "trial") and cmd.target != state.trial_id:
        raise Refused("hold_target_not_found", f"This is trial {state.trial_id}")
    common = {"hold_id": str(uuid.uuid5(DSMB_NS, cmd.decision_id)),
              "rule_id": config.dsmb_rule_id, "decision_id": cmd.decision_id,
              "decided_by": cmd.decided_by, "rationale": cmd.rationale}
    hold: EventData
    if cmd.scope == "patient":
        hold = PatientDosingHeld.model_validate({"patient_id": cmd.target,
                                                 "product": cmd.product, **common})
    elif cmd.scope == "arm":
        hold = ArmSuspended.model_validate({"arm": cmd.target, **common})
    elif cmd.scope == "enrollment":
        hold = EnrollmentPaused.model_validate({"trial_id": cmd.target, **common})
    else:
        hold = TrialHalted.model_validate({"trial_id": cmd.target, **common})
    return [Identified(str(uuid.uuid4()), hold)]


# --- status -----------------------------------------------------------------------------------


def _superseded(config: SafetyConfig, state: SafetyState, due: SusarReportDue) -> bool:
    """A longer SUSAR deadline that a shorter one for the same event comes before or with."""
    fast = config.susar.fatal_or_life_threatening_days
    return due.days != fast and any(
        other.adverse_event_id == due.adverse_event_id and other.days == fast
        and other.due_at <= due.due_at for other in state.susars)


def reporting_clocks(config: SafetyConfig, state: SafetyState,
                     now: datetime | None) -> list[dict[str, object]]:
    """Every reporting deadline, earliest first, flagged `overdue` past its due time (None
    without a `now`) unless a shorter deadline for the same event supersedes it."""
    def overdue(due_at: datetime, superseded: bool = False) -> bool | None:
        return None if now is None else (not superseded and now > due_at)

    clocks: list[tuple[datetime, str, str, dict[str, object]]] = []
    for c in state.sae_reports:
        clocks.append((c.due_at, "sae_initial_report", c.adverse_event_id, {
            "patient_id": c.patient_id, "hours": c.hours, "aware_at": c.aware_at, "superseded": False,
            "overdue": overdue(c.due_at)}))
    for s in state.susars:
        superseded = _superseded(config, state, s)
        clocks.append((s.due_at, "susar_report", s.adverse_event_id, {
            "patient_id": s.patient_id, "days": s.days, "aware_at": s.aware_at, "superseded": superseded,
            "overdue": overdue(s.due_at, superseded)}))
    for f in state.susar_follow_ups:
        clocks.append((f.due_at, "susar_follow_up_report", f.adverse_event_id, {
            "patient_id": f.patient_id, "days": f.days, "initial_due_at": f.initial_due_at,
            "superseded": False, "overdue": overdue(f.due_at)}))
    return [{"kind": kind, "adverse_event_id": ae_id, "due_at": due_at, **rest}
            for due_at, kind, ae_id, rest in sorted(clocks, key=lambda c: c[:3])]


def status(config: SafetyConfig, state: SafetyState, enrollment_cap: int,
           now: datetime | None = None) -> dict[str, object]:
    """The trial's safety status. Lists are in a canonical order (not arrival order), so the same
    history gives the same status in any store, however the topic's partitions interleave.
    With `now`, reporting deadlines past due are flagged overdue."""
    holds = sorted(state.active_holds.values(), key=lambda h: (h.scope, h.target, h.rule_id,
                                                              h.hold_id))
    trial_holds = [h for h in holds if h.scope == "trial"]
    halted = any(h.kind == "TrialHalted" for h in trial_holds)
    randomized = sum(1 for p in state.patients.values() if p.arm is not None)
    enrollment = ("paused" if trial_holds else
                  "closed" if randomized >= enrollment_cap else "open")
    clocks = reporting_clocks(config, state, now)
    bayes = next((r.bayes for r in config.rules if r.bayes is not None), None)
    bayes_id = next((r.id for r in config.rules if r.bayes is not None), None)
    arms: dict[str, object] = {}
    adverse_events = rules.adverse_events_by_arm(state, config)
    for arm in ARMS:
        arm_holds = [h for h in holds if h.scope == "arm" and h.target == arm]
        view: dict[str, object] = {
            "status": "suspended" if arm_holds else "active",
            "patients_dosed": sum(1 for p in state.patients.values() if arm in p.dosed_arms),
            "adverse_events": adverse_events.get(arm, 0),
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
        "susar_reports_due": [{k: c[k] for k in ("adverse_event_id", "patient_id", "days",
                                                 "due_at", "superseded", "overdue")}
                              for c in clocks if c["kind"] == "susar_report"],
        "reporting_clocks": clocks,
    }


def _hold_view(h: Hold) -> dict[str, object]:
    return {"hold_id": h.hold_id, "kind": h.kind, "scope": h.scope, "target": h.target,
            "rule_id": h.rule_id, "product": h.product, "decision_id": h.decision_id}


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


SafetyCommand = Report | AddFollowUp | ReportLab | Lift | Impose | RecordFact


def safety(protocol: ProtocolConfig) -> Decider[SafetyState, SafetyCommand, Emitted]:
    """The safety aggregate under this protocol version's stopping rules."""
    config = protocol.safety

    def decide(state: SafetyState, command: SafetyCommand) -> list[Emitted]:
        # Every firing names the protocol version whose rule it applied.
        return [Identified(i, e.model_copy(update={"protocol_version": protocol.version}))
                if isinstance(e, StoppingRuleTriggered) else Identified(i, e)
                for i, e in decide_any(state, command)]

    def decide_any(state: SafetyState, command: SafetyCommand) -> list[Emitted]:
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
            case Impose():
                return decide_hold(config, state, command)
            case RecordFact():
                return decide_fact(config, state, command.source_event_id, command.event)

    return Decider(SafetyState(protocol.trial_id), evolve, decide)


# Per arm, the figures that compare the arms: interim data, for the DSMB (and admins) only.
INTERIM_ARM_FIELDS = frozenset({"patients_dosed", "adverse_events", "toxicities", "posterior_n",
                                "posterior_probability", "posterior_rule", "posterior_threshold",
                                "posterior_rate", "posterior_exceeded"})


def visible_status(view: dict[str, object], interim: bool, firings: bool) -> dict[str, object]:
    """The status as a reader may see it: without `interim`, no per-arm counts or posteriors and
    no rule evidence; without `firings`, no list of the rules that fired (the holds they put on,
    and what sites must report, stay: that is what everyone must act on)."""
    if interim:
        return view
    arms = view["arms"]
    assert isinstance(arms, dict)
    shown: dict[str, object] = {**view, "arms": {
        arm: {k: v for k, v in figures.items() if k not in INTERIM_ARM_FIELDS}
        for arm, figures in arms.items()}}
    fired = view["triggered_rules"]
    assert isinstance(fired, list)
    if firings:
        shown["triggered_rules"] = [{k: v for k, v in f.items() if k != "evidence"}
                                    for f in fired]
    else:
        del shown["triggered_rules"]
    return shown
