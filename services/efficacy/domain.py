"""Pure efficacy domain: a patient's follow-up to week 52 (assessment visits, assessments and
their corrections, disposition) as one aggregate in the decider shape. No I/O.

Stream `followup-<patient id>`. What efficacy learns from other topics is recorded first as its
own `FollowUpFactRecorded` (the screening baseline, the arm, a withdrawal, the dated assessment
visits), so the stream alone rebuilds the state; a death comes from trial.safety as
`DeathRecorded`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from shared import decider
from shared.decider import Decider
from shared.errors import Refused
from shared.events import (
    AdverseEventFollowedUp,
    AdverseEventReported,
    Arm,
    ArmAssigned,
    ArmCrossedOver,
    AssessmentCorrected,
    AssessmentRecorded,
    DeathRecorded,
    Disposition,
    DosingScheduleCreated,
    DosingScheduleReanchored,
    EventData,
    FollowUpFactRecorded,
    LostToFollowUp,
    PatientEnrolled,
    PatientWithdrawn,
    PlannedVisit,
    StudyCompleted,
    TreatmentDiscontinued,
    VisitMissed,
)
from shared.protocol import ProtocolConfig

VisitStatus = Literal["planned", "done", "missed", "cancelled"]
# An assessment may be recorded a little ahead of the server's clock (site clocks drift).
CLOCK_SKEW = timedelta(minutes=5)
SWEEP = "efficacy-sweep"
MEASURED = ("pasi_regions", "pasi_total", "bsa_percent", "dlqi_items", "dlqi_total", "spga")


def followup_stream(patient_id: str) -> str:
    return f"followup-{patient_id}"


@dataclass(frozen=True)
class Measurements:
    """What one assessment measured (the event's fields, the PASI exact)."""

    pasi_total: Decimal
    pasi_regions: dict[str, Any] | None = None
    bsa_percent: float | None = None
    dlqi_items: tuple[Any, ...] | None = None
    dlqi_total: int | None = None
    spga: int | None = None

    def fields(self) -> dict[str, Any]:
        return {"pasi_regions": self.pasi_regions, "pasi_total": float(self.pasi_total),
                "bsa_percent": self.bsa_percent, "dlqi_items": self.dlqi_items,
                "dlqi_total": self.dlqi_total, "spga": self.spga}

    @classmethod
    def of(cls, event: AssessmentRecorded | AssessmentCorrected) -> Measurements:
        regions = ({str(k): v.model_dump() for k, v in event.pasi_regions.items()}
                   if event.pasi_regions is not None else None)
        # A float's shortest repr is the decimal text it was read from: the PASI stays exact.
        return cls(pasi_total=Decimal(repr(event.pasi_total)), pasi_regions=regions,
                   bsa_percent=event.bsa_percent, dlqi_items=event.dlqi_items,
                   dlqi_total=event.dlqi_total, spga=event.spga)


@dataclass(frozen=True)
class Assessment:
    assessment_id: str
    week: int | None
    unscheduled: bool
    assessed_at: datetime
    assessed_on: date
    after_treatment_discontinued: bool
    measured: Measurements
    corrections: int = 0


@dataclass(frozen=True)
class AssessmentVisit:
    visit: PlannedVisit
    status: VisitStatus = "planned"
    assessment_id: str | None = None


@dataclass(frozen=True)
class FollowUp:
    """A patient's follow-up, folded from the patient's follow-up stream."""

    patient_id: str | None = None
    site_id: str | None = None
    enrolled: bool = False  # the screening baseline is known
    randomized_arm: Arm | None = None  # the analysis arm (intention to treat)
    arm: Arm | None = None  # the arm now (after a crossover)
    randomized_at: datetime | None = None
    screening_pasi: float | None = None
    screening_bsa_percent: float | None = None
    screening_dlqi: int | None = None
    visits: tuple[AssessmentVisit, ...] = ()
    assessments: tuple[Assessment, ...] = ()
    treatment_discontinued_at: datetime | None = None
    treatment_discontinuation_reason: str | None = None
    # The visits are dated from the first dose, not provisionally from randomization (a fact
    # recorded before D95 does not say: taken as fixed, the rule before it).
    day_zero_fixed: bool = False
    ended: Disposition | None = None  # withdrawn, lost_to_follow_up, died, completed
    ended_at: datetime | None = None
    end_reason: str | None = None

    def visit(self, week: int) -> AssessmentVisit | None:
        return next((v for v in self.visits if v.visit.week == week), None)

    def assessment(self, assessment_id: str) -> Assessment | None:
        return next((a for a in self.assessments if a.assessment_id == assessment_id), None)

    @property
    def week0(self) -> Assessment | None:
        return next((a for a in self.assessments if a.week == 0), None)

    @property
    def baseline_pasi(self) -> Decimal | None:
        """The week-0 assessment's PASI; when that is missing, the screening PASI."""
        if (w0 := self.week0) is not None:
            return w0.measured.pasi_total
        return None if self.screening_pasi is None else Decimal(repr(self.screening_pasi))

    @property
    def baseline(self) -> dict[str, Any]:
        w0 = self.week0
        if w0 is not None:
            return {"source": "week_0", "pasi": float(w0.measured.pasi_total),
                    "bsa_percent": w0.measured.bsa_percent, "dlqi": w0.measured.dlqi_total}
        return {"source": "screening", "pasi": self.screening_pasi,
                "bsa_percent": self.screening_bsa_percent, "dlqi": self.screening_dlqi}


def _set_visits(state: FollowUp, visits: Iterable[AssessmentVisit]) -> FollowUp:
    return replace(state, visits=tuple(sorted(visits, key=lambda v: v.visit.week)))


def _cancel_open(state: FollowUp) -> tuple[AssessmentVisit, ...]:
    return tuple(replace(v, status="cancelled") if v.status == "planned" else v
                 for v in state.visits)


def _learn(state: FollowUp, fact: FollowUpFactRecorded) -> FollowUp:
    state = replace(state, patient_id=fact.patient_id, site_id=fact.site_id)
    match fact.fact:
        case "enrolled":
            return replace(state, enrolled=True, screening_pasi=fact.screening_pasi,
                           screening_bsa_percent=fact.screening_bsa_percent,
                           screening_dlqi=fact.screening_dlqi)
        case "randomized":
            return replace(state, randomized_arm=fact.arm, arm=fact.arm, randomized_at=fact.at)
        case "crossed_over":
            return replace(state, arm=fact.arm)
        case "withdrawn":
            return replace(state, ended="withdrawn", ended_at=fact.at, end_reason=fact.reason,
                           visits=_cancel_open(state))
        case "assessment_visits":
            # Re-dated from day 0: done and cancelled visits stay; the rest are planned again on
            # their new dates (as dosing does: a visit missed before day 0 may now lie ahead).
            kept = {v.visit.week: v for v in state.visits if v.status in ("done", "cancelled")}
            state = replace(state, day_zero_fixed=fact.day_zero_fixed is not False)
            return _set_visits(state, [replace(kept[p.week], visit=p) if p.week in kept
                                       else AssessmentVisit(p) for p in fact.visits])
    return state


def evolve(state: FollowUp, event: EventData) -> FollowUp:
    match event:
        case FollowUpFactRecorded():
            return _learn(state, event)
        case AssessmentRecorded():
            found = Assessment(event.assessment_id, event.week, event.unscheduled,
                               event.assessed_at, event.assessed_on,
                               event.after_treatment_discontinued, Measurements.of(event))
            state = replace(state, assessments=(*state.assessments, found))
            if event.week is None:
                return state
            return _set_visits(state, (replace(v, status="done", assessment_id=event.assessment_id)
                                       if v.visit.week == event.week else v for v in state.visits))
        case AssessmentCorrected():
            return replace(state, assessments=tuple(
                replace(a, measured=Measurements.of(event), corrections=a.corrections + 1)
                if a.assessment_id == event.assessment_id else a for a in state.assessments))
        case VisitMissed():
            return _set_visits(state, (replace(v, status="missed")
                                       if v.visit.week == event.week and v.status == "planned"
                                       else v for v in state.visits))
        case TreatmentDiscontinued():
            return replace(state, treatment_discontinued_at=event.discontinued_at,
                           treatment_discontinuation_reason=event.reason)
        case LostToFollowUp():
            return replace(state, ended="lost_to_follow_up", ended_at=event.at,
                           end_reason=event.reason, visits=_cancel_open(state))
        case DeathRecorded():
            return replace(state, ended="died", ended_at=event.reported_at,
                           visits=_cancel_open(state))
        case StudyCompleted():
            return replace(state, ended="completed", ended_at=event.completed_at,
                           visits=_cancel_open(state))
    return state


def fold(events: Iterable[EventData]) -> FollowUp:
    return decider.fold(evolve, FollowUp(), events)


# --- what efficacy learns from other topics ---------------------------------------------------


@dataclass(frozen=True)
class Learn:
    """An event of trial.enrollment, trial.dosing or trial.safety, and its id."""

    event: EventData
    event_id: str
    at: datetime  # the event's time


def _fact(learn: Learn, fact: str, at: datetime | None = None, **fields: Any
          ) -> FollowUpFactRecorded:
    e: Any = learn.event
    return FollowUpFactRecorded.model_validate({
        "patient_id": e.patient_id, "site_id": e.site_id, "fact": fact, "at": at or learn.at,
        "source_event_id": learn.event_id, **fields})


def decide_learn(state: FollowUp, learn: Learn, protocol: ProtocolConfig) -> list[EventData]:
    e = learn.event
    match e:
        case PatientEnrolled() if not state.enrolled:
            return [_fact(learn, "enrolled", e.enrolled_at, screening_pasi=e.baseline_pasi,
                          screening_bsa_percent=e.baseline_bsa_percent,
                          screening_dlqi=e.baseline_dlqi)]
        case ArmAssigned() if state.randomized_arm is None:
            return [_fact(learn, "randomized", e.assigned_at, arm=e.arm)]
        case ArmCrossedOver() if state.arm != e.to_arm:
            return [_fact(learn, "crossed_over", e.crossed_over_at, arm=e.to_arm)]
        case PatientWithdrawn() if state.ended is None:
            return [_fact(learn, "withdrawn", e.withdrawn_at, reason=e.reason)]
        case DosingScheduleCreated() | DosingScheduleReanchored():
            visits = tuple(v for v in e.visits if v.kind == "assessment")
            if not visits or state.ended is not None:
                return []  # a crossover's calendar has doses only: the assessments stay
            return [_fact(learn, "assessment_visits", visits=visits,
                          day_zero_fixed=isinstance(e, DosingScheduleReanchored))]
        case AdverseEventReported() | AdverseEventFollowedUp():
            if state.ended is None and _fatal(e, protocol):
                return [DeathRecorded(patient_id=e.patient_id, site_id=e.site_id,
                                      adverse_event_id=e.adverse_event_id,
                                      reported_at=e.reported_at or learn.at,
                                      source_event_id=learn.event_id)]
    return []


def _fatal(e: AdverseEventReported | AdverseEventFollowedUp, protocol: ProtocolConfig) -> bool:
    return e.outcome == "fatal" or (e.ctcae_grade is not None
                                    and e.ctcae_grade >= protocol.safety.death_grade)


# --- assessments ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordAssessment:
    assessment_id: str
    week: int | None  # None: unscheduled
    assessed_at: datetime
    measured: Measurements
    now: datetime


def _known(state: FollowUp) -> tuple[str, str, Arm]:
    if state.patient_id is None or state.site_id is None or state.randomized_arm is None:
        raise Refused("patient_not_found", "No such patient")
    return state.patient_id, state.site_id, state.randomized_arm


def _still_followed(state: FollowUp) -> None:
    if state.ended == "withdrawn":
        raise Refused("withdrawn", "The patient withdrew consent; nothing more is recorded")
    if state.ended is not None:
        raise Refused("study_ended", f"The patient's study has ended ({state.ended})",
                      disposition=state.ended)


def decide_assessment(state: FollowUp, command: RecordAssessment,
                      protocol: ProtocolConfig) -> list[EventData]:
    patient_id, site_id, arm = _known(state)
    _still_followed(state)
    assessed_at = command.assessed_at.astimezone(UTC)
    if assessed_at > command.now + CLOCK_SKEW:
        raise Refused("assessed_in_future", "assessed_at lies in the future")
    assessed_on = protocol.site_date(site_id, assessed_at)
    late = False
    if command.week is not None:
        if command.week not in protocol.assessment_weeks:
            raise Refused("not_an_assessment_week", f"Week {command.week} is not an assessment "
                          "week", assessment_weeks=list(protocol.assessment_weeks))
        slot = state.visit(command.week)
        if slot is None:
            raise Refused("assessment_visits_unknown", "The patient's assessment visits are "
                          "not known yet; retry shortly")
        if slot.status == "done":
            raise Refused("already_assessed", f"Week {command.week} was assessed already; a "
                          "correction is POST .../assessments/{assessment_id}/corrections",
                          assessment_id=slot.assessment_id)
        v = slot.visit
        if not v.window_start <= assessed_on <= v.window_end:
            raise Refused("out_of_window", f"Week {v.week} is due {v.due_date}, window "
                          f"{v.window_start} to {v.window_end} (the site's dates); outside it "
                          "only as an unscheduled assessment", due_date=str(v.due_date),
                          window_start=str(v.window_start), window_end=str(v.window_end))
        late = slot.status == "missed"  # within its window, recorded after it closed
    after = (state.treatment_discontinued_at is not None
             and assessed_at >= state.treatment_discontinued_at)
    recorded = AssessmentRecorded(
        assessment_id=command.assessment_id, patient_id=patient_id, site_id=site_id, arm=arm,
        week=command.week, unscheduled=command.week is None, assessed_at=assessed_at,
        assessed_on=assessed_on, after_treatment_discontinued=after, late_entry=late,
        **command.measured.fields())
    events: list[EventData] = [recorded]
    if command.week is not None and command.week == max(protocol.assessment_weeks):
        # A visit whose window closed before the completing one and that no sweep has marked
        # yet is missed, not silently cancelled by the completion: the ledger must not depend
        # on whether the sweep ran first (D49).
        closed = [_missed(state, v, command.now) for v in state.visits
                  if v.status == "planned" and v.visit.week != command.week
                  and v.visit.window_end < assessed_on]
        events = [*closed, recorded, StudyCompleted(
            patient_id=patient_id, site_id=site_id, assessment_id=command.assessment_id,
            completed_at=assessed_at)]
    return events


@dataclass(frozen=True)
class CorrectAssessment:
    correction_id: str
    assessment_id: str
    changes: dict[str, Any]  # the measurement fields that change, with their new values
    reason: str
    now: datetime


def decide_correction(state: FollowUp, command: CorrectAssessment) -> list[EventData]:
    patient_id, site_id, _ = _known(state)
    if state.ended == "withdrawn":
        raise Refused("withdrawn", "The patient withdrew consent; nothing more is recorded")
    found = state.assessment(command.assessment_id)
    if found is None:
        raise Refused("assessment_not_found", f"No assessment {command.assessment_id} for "
                      "this patient")
    before = found.measured.fields()
    after = {**before, **command.changes}
    changed = tuple(k for k in MEASURED if after[k] != before[k])
    if not changed:
        raise Refused("nothing_to_correct", "The correction changes nothing")
    return [AssessmentCorrected(
        correction_id=command.correction_id, assessment_id=command.assessment_id,
        patient_id=patient_id, site_id=site_id, week=found.week, changed=changed,
        reason=command.reason, corrected_at=command.now, **after)]


# --- disposition ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscontinueTreatment:
    reason: str
    decided_by: str
    now: datetime


@dataclass(frozen=True)
class DeclareLost:
    reason: str
    declared_by: str
    now: datetime


def decide_discontinuation(state: FollowUp, command: DiscontinueTreatment) -> list[EventData]:
    patient_id, site_id, _ = _known(state)
    _still_followed(state)
    if state.treatment_discontinued_at is not None:
        raise Refused("already_discontinued", "The patient's treatment was discontinued "
                      "already", discontinued_at=state.treatment_discontinued_at.isoformat())
    return [TreatmentDiscontinued(patient_id=patient_id, site_id=site_id, reason=command.reason,
                                  discontinued_at=command.now, decided_by=command.decided_by)]


def decide_lost(state: FollowUp, command: DeclareLost) -> list[EventData]:
    patient_id, site_id, _ = _known(state)
    _still_followed(state)
    return [LostToFollowUp(patient_id=patient_id, site_id=site_id,
                           declared_by=command.declared_by, reason=command.reason,
                           missed_weeks=_missed_in_a_row(state), at=command.now)]


def _missed_in_a_row(state: FollowUp) -> tuple[int, ...]:
    """The missed visits since the patient was last seen (any assessment, unscheduled too)."""
    seen = max((a.assessed_on for a in state.assessments), default=None)
    return tuple(v.visit.week for v in state.visits
                 if v.status == "missed" and (seen is None or v.visit.due_date > seen))


def _missed(state: FollowUp, slot: AssessmentVisit, now: datetime) -> VisitMissed:
    """An assessment visit whose window closed undone."""
    assert state.patient_id is not None and state.site_id is not None
    return VisitMissed(patient_id=state.patient_id, site_id=state.site_id,
                       arm=state.arm or state.randomized_arm, week=slot.visit.week,
                       kind="assessment", due_date=slot.visit.due_date,
                       window_end=slot.visit.window_end, detected_at=now)


@dataclass(frozen=True)
class Sweep:
    now: datetime


def decide_sweep(state: FollowUp, command: Sweep, protocol: ProtocolConfig) -> list[EventData]:
    """Every planned assessment visit whose window closed before the site's today is missed;
    with the configured number missed in a row, the patient is lost to follow-up. Not while the
    visits are only provisionally dated from randomization and the first dose may still come
    (a dose held by safety, say): that dose re-dates them, and a visit missed on the
    provisional calendar may then lie ahead (D95); once day 0 is fixed, or the treatment
    discontinued before it (the provisional calendar then stands), the run counts."""
    if state.patient_id is None or state.site_id is None or state.randomized_arm is None:
        return []
    if state.ended is not None:
        return []
    today = protocol.site_date(state.site_id, command.now)
    missed: list[EventData] = [_missed(state, v, command.now) for v in state.visits
                               if v.status == "planned" and v.visit.window_end < today]
    if not missed:
        return []
    after = decider.fold(evolve, state, missed)
    weeks = _missed_in_a_row(after)
    dated = state.day_zero_fixed or state.treatment_discontinued_at is not None
    if dated and len(weeks) >= protocol.efficacy.lost_to_follow_up_after_missed:
        return [*missed, LostToFollowUp(
            patient_id=state.patient_id, site_id=state.site_id, declared_by=SWEEP,
            reason=f"{len(weeks)} scheduled assessments missed in a row (weeks "
                   f"{', '.join(map(str, weeks))})", missed_weeks=weeks, at=command.now)]
    return missed


# --- the aggregate ----------------------------------------------------------------------------

FollowUpCommand = (Learn | RecordAssessment | CorrectAssessment | DiscontinueTreatment
                   | DeclareLost | Sweep)


def followups(protocol: ProtocolConfig) -> Decider[FollowUp, FollowUpCommand, EventData]:
    """A patient's follow-up under this protocol version."""

    def decide(state: FollowUp, command: FollowUpCommand) -> list[EventData]:
        match command:
            case Learn():
                return decide_learn(state, command, protocol)
            case RecordAssessment():
                return decide_assessment(state, command, protocol)
            case CorrectAssessment():
                return decide_correction(state, command)
            case DiscontinueTreatment():
                return decide_discontinuation(state, command)
            case DeclareLost():
                return decide_lost(state, command)
            case Sweep():
                return decide_sweep(state, command, protocol)

    return Decider(FollowUp(), evolve, decide)
