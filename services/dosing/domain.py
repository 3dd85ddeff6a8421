"""Pure dosing domain: a patient's calendars, the doses given, and the guards on a new dose.

One aggregate in the decider shape (`records(protocol)`): the patient's dosing record, stream
`schedule-<patient id>`, commanded by enrolment events (a calendar, a withdrawal, a crossover),
by a dose to record (with the holds in force), and by the missed-visit sweep. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Literal

from services.dosing import calendar
from services.dosing import holds as holding
from shared import decider
from shared.decider import Decider
from shared.errors import Refused
from shared.events import (
    Arm,
    ArmAssigned,
    ArmCrossedOver,
    AssessmentRecorded,
    AssessmentVisitNoted,
    DeathRecorded,
    Disposition,
    DosingDispositionNoted,
    DosingScheduleCreated,
    DosingScheduleReanchored,
    EventData,
    InfusionGiven,
    LostToFollowUp,
    MethotrexateDoseGiven,
    PatientWithdrawn,
    PlannedVisit,
    ProtocolDeviationRecorded,
    StudyCompleted,
    TreatmentDiscontinued,
    VisitHeld,
    VisitMissed,
    VisitRef,
    VisitsCancelled,
)
from shared.protocol import ProtocolConfig

# "done": an assessment efficacy recorded (dosing learns it from trial.efficacy).
Status = Literal["planned", "given", "done", "missed", "held", "cancelled"]
# A dose may be recorded a little ahead of the server's clock (site clocks drift), not more.
CLOCK_SKEW = timedelta(minutes=5)
MISMATCH_TOLERANCE = 0.10


def schedule_stream(patient_id: str) -> str:
    """The patient's dosing stream: calendars, doses, missed and cancelled visits."""
    return f"schedule-{patient_id}"


@dataclass(frozen=True)
class Slot:
    """One visit of one calendar and what became of it."""

    arm: Arm
    visit: PlannedVisit
    status: Status = "planned"

    @property
    def is_dose(self) -> bool:
        return self.visit.kind != "assessment"

    @property
    def is_open(self) -> bool:
        return self.status == "planned"


@dataclass(frozen=True)
class Calendar:
    arm: Arm
    earliest: date  # the randomization (or crossover) day: no dose before it
    anchor_date: date
    day_zero_fixed: bool
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class DosingRecord:
    """A patient's dosing state, folded from the patient's dosing stream."""

    patient_id: str | None = None
    site_id: str | None = None
    calendars: tuple[Calendar, ...] = ()
    weight_kg: float = 0.0  # the latest known weight: baseline, then each infusion's
    withdrawn: bool = False
    last_mtx_dose_mg: float | None = None  # the titration's last step
    treatment_discontinued: bool = False  # no dose after it; the assessments go on
    study_ended: Disposition | None = None  # lost to follow-up, died, completed: no visit after

    @property
    def status(self) -> str:
        """The patient's status on a site's worklist."""
        if self.withdrawn:
            return "withdrawn"
        if self.study_ended is not None:
            return self.study_ended
        return "treatment_discontinued" if self.treatment_discontinued else "active"

    @property
    def current(self) -> Calendar | None:
        return self.calendars[-1] if self.calendars else None

    def slots(self) -> list[Slot]:
        return [s for c in self.calendars for s in c.slots]


def _with_current(state: DosingRecord, cal: Calendar) -> DosingRecord:
    return replace(state, calendars=(*state.calendars[:-1], cal))


def _mark(cal: Calendar, kind: str, week: int, status: Status) -> Calendar:
    slots = tuple(replace(s, status=status) if (s.visit.kind, s.visit.week) == (kind, week)
                  else s for s in cal.slots)
    return replace(cal, slots=slots)


def evolve(state: DosingRecord, event: EventData) -> DosingRecord:
    match event:
        case DosingScheduleCreated():
            cal = Calendar(event.arm, event.anchor_date, event.anchor_date, False,
                           tuple(Slot(event.arm, v) for v in event.visits))
            return replace(state, patient_id=event.patient_id, site_id=event.site_id,
                           calendars=(*state.calendars, cal),
                           weight_kg=state.weight_kg or event.weight_kg or 0.0)
        case DosingScheduleReanchored():
            assert state.current is not None
            # Every visit not yet given is planned again, on its new date: a visit missed or
            # held before day 0 was fixed may now lie ahead.
            statuses = {(s.visit.kind, s.visit.week): s.status for s in state.current.slots
                        if s.status in ("given", "done", "cancelled")}
            slots = tuple(Slot(event.arm, v, statuses.get((v.kind, v.week), "planned"))
                          for v in event.visits)
            return _with_current(state, replace(state.current, anchor_date=event.anchor_date,
                                                day_zero_fixed=True, slots=slots))
        case InfusionGiven():
            assert state.current is not None
            return replace(_with_current(state, _mark(state.current, "infusion", event.week,
                                                      "given")), weight_kg=event.weight_kg)
        case MethotrexateDoseGiven():
            assert state.current is not None
            return replace(_with_current(state, _mark(state.current, "methotrexate", event.week,
                                                      "given")), last_mtx_dose_mg=event.dose_mg)
        case VisitMissed() | VisitHeld():
            status: Status = "missed" if isinstance(event, VisitMissed) else "held"
            cals = tuple(_mark(c, event.kind, event.week, status)
                         if c.arm == event.arm and _open(c, event.kind, event.week) else c
                         for c in state.calendars)
            return replace(state, calendars=cals)
        case VisitsCancelled():
            return _cancel(state, event)
        case AssessmentVisitNoted():
            cals = tuple(_mark(c, "assessment", event.week, event.status)
                         if any(s.visit.kind == "assessment" for s in c.slots) else c
                         for c in state.calendars)
            return replace(state, calendars=cals)
        case DosingDispositionNoted():
            if event.disposition == "treatment_discontinued":
                return replace(state, treatment_discontinued=True)
            if event.disposition != "withdrawn":
                return replace(state, study_ended=event.disposition)
    return state


def _open(cal: Calendar, kind: str, week: int) -> bool:
    return any(s.is_open and (s.visit.kind, s.visit.week) == (kind, week) for s in cal.slots)


def _cancel(state: DosingRecord, event: VisitsCancelled) -> DosingRecord:
    if event.cause == "withdrawn":
        cals = tuple(replace(c, slots=tuple(replace(s, status="cancelled") if s.is_open else s
                                            for s in c.slots)) for c in state.calendars)
        return replace(state, calendars=cals, withdrawn=True)
    if event.cause in ("lost_to_follow_up", "died", "completed"):  # the study ends: every visit
        cals = tuple(replace(c, slots=tuple(replace(s, status="cancelled") if s.is_open else s
                                            for s in c.slots)) for c in state.calendars)
        return replace(state, calendars=cals)
    if event.cause == "treatment_discontinued":  # every dose, whichever calendar; not the rest
        cals = tuple(replace(c, slots=tuple(replace(s, status="cancelled")
                                            if s.is_open and s.is_dose else s
                                            for s in c.slots)) for c in state.calendars)
        return replace(state, calendars=cals)
    assert state.current is not None  # a crossover ends the current arm's open doses
    cur = state.current
    slots = tuple(replace(s, status="cancelled") if s.is_open and s.is_dose else s
                  for s in cur.slots)
    return _with_current(state, replace(cur, slots=slots))


def fold(events: Iterable[EventData]) -> DosingRecord:
    return decider.fold(evolve, DosingRecord(), events)


# --- calendars from enrolment events ---------------------------------------------------------


def calendar_for(assigned: ArmAssigned, protocol: ProtocolConfig) -> DosingScheduleCreated:
    """The first calendar: every dose and assessment, dated from randomization until day 0
    (the randomization's date at the patient's site)."""
    anchor = protocol.site_date(assigned.site_id, assigned.assigned_at)
    return DosingScheduleCreated(
        patient_id=assigned.patient_id, site_id=assigned.site_id, arm=assigned.arm,
        anchor_date=anchor,
        visits=calendar.plan(assigned.arm, protocol, anchor, anchor, assigned.baseline_weight_kg),
        weight_kg=assigned.baseline_weight_kg)


def decide_withdrawal(state: DosingRecord, withdrawn: PatientWithdrawn) -> list[EventData]:
    """Every visit not yet done is cancelled."""
    cur = state.current
    if cur is None or state.withdrawn:
        return []
    open_slots = [s for s in state.slots() if s.is_open]
    return [VisitsCancelled(
        patient_id=withdrawn.patient_id, site_id=withdrawn.site_id, arm=cur.arm,
        cause="withdrawn", visits=tuple(_ref(s.visit) for s in open_slots),
        cancelled_at=withdrawn.withdrawn_at)]


def decide_crossover(state: DosingRecord, crossed: ArmCrossedOver,
                     protocol: ProtocolConfig) -> list[EventData]:
    """The old arm's open doses are cancelled; the new arm's doses get a calendar of their own,
    dated from the crossover day until its own week-0 dose. Assessments keep the first day 0."""
    cur = state.current
    if cur is None or state.withdrawn or cur.arm == crossed.to_arm:
        return []
    day = protocol.site_date(crossed.site_id, crossed.crossed_over_at)
    weight = state.weight_kg
    open_doses = [s for s in cur.slots if s.is_open and s.is_dose]
    return [
        VisitsCancelled(patient_id=crossed.patient_id, site_id=crossed.site_id, arm=cur.arm,
                        cause="crossover", visits=tuple(_ref(s.visit) for s in open_doses),
                        cancelled_at=crossed.crossed_over_at),
        DosingScheduleCreated(patient_id=crossed.patient_id, site_id=crossed.site_id,
                              arm=crossed.to_arm, anchor_date=day,
                              visits=calendar.plan(crossed.to_arm, protocol, day, day, weight,
                                                   assessments=False),
                              weight_kg=weight),
    ]


def decide_followup(state: DosingRecord, noted: EfficacyNotice) -> list[EventData]:
    """What efficacy recorded, as the schedule must show it: an assessment visit done or
    missed; a disposition, and the visits it cancels."""
    e, source = noted.event, noted.event_id
    if state.patient_id is None or state.site_id is None or state.current is None:
        return []
    common = {"patient_id": state.patient_id, "site_id": state.site_id}
    match e:
        case AssessmentRecorded() if e.week is not None:
            return [AssessmentVisitNoted(**common, week=e.week, status="done",
                                         at=e.assessed_at, source_event_id=source)]
        case VisitMissed() if e.kind == "assessment":
            return [AssessmentVisitNoted(**common, week=e.week, status="missed",
                                         at=e.detected_at, source_event_id=source)]
    disposition: Disposition
    reason: str | None
    match e:
        case TreatmentDiscontinued() if not state.treatment_discontinued:
            disposition, at, reason = "treatment_discontinued", e.discontinued_at, e.reason
        case LostToFollowUp():
            disposition, at, reason = "lost_to_follow_up", e.at, e.reason
        case DeathRecorded():
            disposition, at, reason = "died", e.reported_at, None
        case StudyCompleted():
            disposition, at, reason = "completed", e.completed_at, None
        case _:
            return []
    if state.withdrawn or state.study_ended is not None:
        return []
    ends_study = disposition != "treatment_discontinued"
    closing = [s for s in state.slots() if s.is_open and (ends_study or s.is_dose)]
    found: list[EventData] = [DosingDispositionNoted(**common, disposition=disposition, at=at,
                                                     reason=reason, source_event_id=source)]
    if closing:
        found.append(VisitsCancelled(**common, arm=state.current.arm, cause=disposition,
                                     visits=tuple(_ref(s.visit) for s in closing),
                                     cancelled_at=at))
    return found


def _ref(v: PlannedVisit) -> VisitRef:
    return VisitRef(week=v.week, kind=v.kind, due_date=v.due_date)


def decide_missed(state: DosingRecord, now: datetime, protocol: ProtocolConfig,
                  holds: holding.Holds = holding.Holds()) -> list[EventData]:
    """Every open dosing visit whose window closed before today (the site's today) is missed,
    unless a safety hold in force stops its dose: then it is held, not missed."""
    if state.patient_id is None or state.site_id is None:
        return []
    today = protocol.site_date(state.site_id, now)
    found: list[EventData] = []
    for s in state.slots():
        if not (s.is_open and s.is_dose and s.visit.window_end < today):
            continue
        assert s.visit.kind != "assessment"
        held = holding.covering(holds, state.patient_id, s.arm, s.visit.kind)
        common = {"patient_id": state.patient_id, "site_id": state.site_id, "arm": s.arm,
                  "week": s.visit.week, "kind": s.visit.kind, "due_date": s.visit.due_date,
                  "window_end": s.visit.window_end, "detected_at": now}
        found.append(VisitHeld(**common, hold_id=held[0].hold_id, rule_id=held[0].rule_id)
                     if held else VisitMissed(**common))
    return found


# --- recording a dose -------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordInfusion:
    infusion_id: str
    week: int
    given_at: datetime
    weight_kg: float
    cells_administered: int
    lot_number: str
    deviation_reason: str | None
    now: datetime
    weight_confirmed: bool = False  # the site confirms a weight far from the last one


@dataclass(frozen=True)
class RecordMethotrexateDose:
    dose_id: str
    week: int
    dose_mg: float
    given_at: datetime
    deviation_reason: str | None
    now: datetime


DoseCommand = RecordInfusion | RecordMethotrexateDose
Deviation = Literal["out_of_window", "dose_mismatch", "dose_step_exceeded"]


def _step_exceeded(state: DosingRecord, slot: Slot, dose_mg: float,
                   protocol: ProtocolConfig) -> str | None:
    """Why a methotrexate dose escalates beyond the titration scheme, or None."""
    planned = slot.visit.planned_dose_mg
    if planned is not None and dose_mg > planned + 1e-9:
        return f"{dose_mg:g} mg is above the week {slot.visit.week} dose of the titration " \
               f"scheme ({planned:g} mg)"
    last = state.last_mtx_dose_mg
    if last is not None and dose_mg - last > protocol.mtx_max_step_mg + 1e-9:
        return f"{dose_mg:g} mg rises more than {protocol.mtx_max_step_mg:g} mg from the " \
               f"last dose ({last:g} mg)"
    return None


def _weight_changed(state: DosingRecord, weight_kg: float, protocol: ProtocolConfig) -> bool:
    """Further from the last recorded weight than the protocol lets pass unconfirmed."""
    last = state.weight_kg
    return last > 0 and abs(weight_kg - last) > protocol.weight_change_confirm_fraction * last


def decide_dose(state: DosingRecord, holds: holding.Holds, command: DoseCommand,
                protocol: ProtocolConfig) -> list[EventData]:
    """The guards on a dose, in order; the dose (and day 0, and any deviation) if all pass."""
    kind: holding.DoseKind = "infusion" if isinstance(command, RecordInfusion) else "methotrexate"
    cur = state.current
    if cur is None or state.patient_id is None or state.site_id is None:
        raise Refused("patient_not_found", "No such patient")
    if state.withdrawn:
        raise Refused("withdrawn", "The patient has withdrawn; no further doses")
    if state.study_ended is not None:
        raise Refused("study_ended", f"The patient's study has ended ({state.study_ended})",
                      disposition=state.study_ended)
    if state.treatment_discontinued:
        raise Refused("treatment_discontinued", "The patient's treatment was discontinued; no "
                      "further doses (the assessments go on)")
    arm = protocol.arms[cur.arm]
    if arm.kind != kind:
        raise Refused("wrong_arm", f"The patient's arm {cur.arm} receives no {kind}",
                      arm=cur.arm)
    slot = next((s for s in cur.slots if (s.visit.kind, s.visit.week) == (kind, command.week)),
                None)
    if slot is None:
        raise Refused("not_a_dosing_week", f"Week {command.week} has no {kind} in arm "
                      f"{cur.arm}", dose_weeks=list(arm.dose_weeks))
    if slot.status == "given":
        raise Refused("already_given", f"The week {command.week} {kind} was given already")
    if slot.status == "cancelled":
        raise Refused("visit_cancelled", f"The week {command.week} {kind} was cancelled")
    given_at = command.given_at.astimezone(UTC)
    if unapplied := holding.unapplied_over(holds, state.patient_id, cur.arm):
        # Dosing cannot tell whether that record holds this dose: it refuses (fails closed).
        raise Refused("safety_record_unapplied", "A safety record that may concern this dose "
                      "could not be applied; dosing waits for an operator to resolve it",
                      record_id=unapplied.record_id, scope=unapplied.scope,
                      target=unapplied.target)
    held = holding.blocking(holds, state.patient_id, cur.arm, kind, given_at)
    if held is not None:
        when = "is" if held.hold_id in holds.active else "was, when this dose was given,"
        raise Refused("dosing_held", f"Dosing {when} held by safety rule {held.rule_id}",
                      rule_id=held.rule_id, hold_id=held.hold_id, scope=held.scope,
                      target=held.target)
    # A hold in force that took effect after the dose was given: a late entry, accepted.
    earlier = holding.covering(holds, state.patient_id, cur.arm, kind)
    if command.given_at > command.now + CLOCK_SKEW:
        raise Refused("given_in_future", "given_at lies in the future")
    deviations: list[Deviation] = []
    if isinstance(command, RecordMethotrexateDose):
        low, high = protocol.mtx_dose_range_mg
        if not low <= command.dose_mg <= high:
            raise Refused("dose_out_of_range",
                          f"A methotrexate dose must lie in [{low:g}, {high:g}] mg",
                          dose_mg=command.dose_mg, range_mg=[low, high])
        if step := _step_exceeded(state, slot, command.dose_mg, protocol):
            if command.deviation_reason is None:
                raise Refused("dose_step_exceeded", step, dose_mg=command.dose_mg,
                              planned_dose_mg=slot.visit.planned_dose_mg,
                              last_dose_mg=state.last_mtx_dose_mg,
                              max_step_mg=protocol.mtx_max_step_mg)
            deviations.append("dose_step_exceeded")
    elif _weight_changed(state, command.weight_kg, protocol) and not command.weight_confirmed:
        raise Refused("weight_change_unconfirmed",
                      f"{command.weight_kg:g} kg is more than "
                      f"{protocol.weight_change_confirm_fraction:.0%} from the last recorded "
                      f"{state.weight_kg:g} kg; confirm it (weight_confirmed) to record the dose",
                      weight_kg=command.weight_kg, last_weight_kg=state.weight_kg)
    # Windows are calendar days at the patient's site, whatever offset given_at was written in.
    given_on = protocol.site_date(state.site_id, given_at)
    if given_on < cur.earliest:  # no reason makes it possible: the arm was not known yet
        raise Refused("given_before_assignment", f"The dose is dated {given_on}, before the "
                      f"patient's assignment to {cur.arm} on {cur.earliest} (day 0 is on or "
                      "after the randomization day)", assigned_on=str(cur.earliest))
    v = slot.visit
    if not calendar.in_window(v, given_on):
        if command.deviation_reason is None:
            raise Refused("out_of_window", f"Week {v.week} is due {v.due_date}, window "
                          f"{v.window_start} to {v.window_end}; give a deviation_reason to "
                          "record it anyway", due_date=str(v.due_date),
                          window_start=str(v.window_start), window_end=str(v.window_end))
        deviations.append("out_of_window")
    late = {"late_entry": bool(earlier),
            "entered_after_hold": earlier[0].hold_id if earlier else None}
    events: list[EventData]
    if isinstance(command, RecordInfusion):
        assert arm.cells_per_kg is not None
        planned = calendar.planned_cells(arm.cells_per_kg, command.weight_kg)
        if abs(command.cells_administered - planned) > MISMATCH_TOLERANCE * planned:
            if command.deviation_reason is None:
                raise Refused("dose_mismatch", f"{command.cells_administered} cells is more "
                              f"than 10 % from the planned {planned} ({arm.cells_per_kg:g} "
                              f"cells/kg x {command.weight_kg:g} kg)", planned_cells=planned)
            deviations.append("dose_mismatch")
        dose_id = command.infusion_id
        events = [InfusionGiven(
            infusion_id=command.infusion_id, patient_id=state.patient_id, site_id=state.site_id,
            arm=cur.arm, week=command.week, cells_administered=command.cells_administered,
            cells_per_kg=arm.cells_per_kg, weight_kg=command.weight_kg,
            lot_number=command.lot_number, given_at=given_at,
            deviation_reason=command.deviation_reason,
            weight_change_confirmed=_weight_changed(state, command.weight_kg, protocol),
            **late)]
    else:
        dose_id = command.dose_id
        events = [MethotrexateDoseGiven(
            dose_id=command.dose_id, patient_id=state.patient_id, site_id=state.site_id,
            week=command.week, dose_mg=command.dose_mg, given_at=given_at,
            deviation_reason=command.deviation_reason, **late)]
    if command.week == 0 and not cur.day_zero_fixed:
        events.append(DosingScheduleReanchored(
            patient_id=state.patient_id, site_id=state.site_id, arm=cur.arm,
            anchor_date=given_on,
            visits=calendar.reanchor(tuple(s.visit for s in cur.slots), given_on,
                                     cur.earliest, protocol.window_days)))
    if deviations:  # a reason alone, on an on-time, on-target dose, is no deviation
        assert command.deviation_reason is not None
        events.append(ProtocolDeviationRecorded(
            deviation_id=f"dev-{dose_id}", patient_id=state.patient_id, site_id=state.site_id,
            arm=cur.arm, week=command.week, kind=kind, dose_event_id=dose_id,
            deviations=tuple(deviations), reason=command.deviation_reason,
            recorded_at=command.now))
    return events


# --- the aggregate ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GiveDose:
    """A dose to record, with the holds in force as the recording transaction reads them."""

    dose: DoseCommand
    holds: holding.Holds


@dataclass(frozen=True)
class StartCalendar:
    assigned: ArmAssigned


@dataclass(frozen=True)
class EndForWithdrawal:
    withdrawn: PatientWithdrawn


@dataclass(frozen=True)
class CrossOver:
    crossed: ArmCrossedOver


@dataclass(frozen=True)
class MarkMissed:
    """The sweep: visits whose window closed, missed (or held, under the holds in force)."""

    now: datetime
    holds: holding.Holds


@dataclass(frozen=True)
class EfficacyNotice:
    """An event of trial.efficacy (an assessment, a missed assessment, a disposition)."""

    event: EventData
    event_id: str


RecordCommand = (GiveDose | StartCalendar | EndForWithdrawal | CrossOver | MarkMissed
                 | EfficacyNotice)


def records(protocol: ProtocolConfig) -> Decider[DosingRecord, RecordCommand, EventData]:
    """A patient's dosing record under this protocol version."""

    def decide(state: DosingRecord, command: RecordCommand) -> list[EventData]:
        match command:
            case GiveDose():
                return decide_dose(state, command.holds, command.dose, protocol)
            case StartCalendar():
                # The first assignment makes the calendar; only a crossover adds another.
                return [] if state.calendars else [calendar_for(command.assigned, protocol)]
            case EndForWithdrawal():
                return decide_withdrawal(state, command.withdrawn)
            case CrossOver():
                return decide_crossover(state, command.crossed, protocol)
            case MarkMissed():
                return decide_missed(state, command.now, protocol, command.holds)
            case EfficacyNotice():
                return decide_followup(state, command)

    return Decider(DosingRecord(), evolve, decide)
