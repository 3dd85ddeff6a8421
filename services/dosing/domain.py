"""Pure dosing domain: a patient's calendars, the doses given, and the guards on a new dose.

One aggregate in the decider shape (`records(protocol)`): the patient's dosing record, stream
`schedule-<patient id>`, commanded by enrolment events (a calendar, a withdrawal, a crossover),
by a dose to record (with the holds in force), and by the missed-visit sweep. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
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
    DosingScheduleCreated,
    DosingScheduleReanchored,
    EventData,
    InfusionGiven,
    MethotrexateDoseGiven,
    PatientWithdrawn,
    PlannedVisit,
    ProtocolDeviationRecorded,
    VisitMissed,
    VisitRef,
    VisitsCancelled,
)
from shared.protocol import ProtocolConfig

Status = Literal["planned", "given", "missed", "cancelled"]
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
            statuses = {(s.visit.kind, s.visit.week): s.status for s in state.current.slots}
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
            return _with_current(state, _mark(state.current, "methotrexate", event.week, "given"))
        case VisitMissed():
            cals = tuple(_mark(c, event.kind, event.week, "missed")
                         if c.arm == event.arm and _open(c, event.kind, event.week) else c
                         for c in state.calendars)
            return replace(state, calendars=cals)
        case VisitsCancelled():
            return _cancel(state, event)
    return state


def _open(cal: Calendar, kind: str, week: int) -> bool:
    return any(s.is_open and (s.visit.kind, s.visit.week) == (kind, week) for s in cal.slots)


def _cancel(state: DosingRecord, event: VisitsCancelled) -> DosingRecord:
    if event.cause == "withdrawn":
        cals = tuple(replace(c, slots=tuple(replace(s, status="cancelled") if s.is_open else s
                                            for s in c.slots)) for c in state.calendars)
        return replace(state, calendars=cals, withdrawn=True)
    assert state.current is not None  # a crossover ends the current arm's open doses
    cur = state.current
    slots = tuple(replace(s, status="cancelled") if s.is_open and s.is_dose else s
                  for s in cur.slots)
    return _with_current(state, replace(cur, slots=slots))


def fold(events: Iterable[EventData]) -> DosingRecord:
    return decider.fold(evolve, DosingRecord(), events)


# --- calendars from enrolment events ---------------------------------------------------------


def calendar_for(assigned: ArmAssigned, protocol: ProtocolConfig) -> DosingScheduleCreated:
    """The first calendar: every dose and assessment, dated from randomization until day 0."""
    anchor = assigned.assigned_at.date()
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
    day = crossed.crossed_over_at.date()
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


def _ref(v: PlannedVisit) -> VisitRef:
    return VisitRef(week=v.week, kind=v.kind, due_date=v.due_date)


def decide_missed(state: DosingRecord, now: datetime) -> list[EventData]:
    """Every open dosing visit whose window closed before today is missed."""
    today = now.date()
    if state.patient_id is None or state.site_id is None:
        return []
    return [VisitMissed(patient_id=state.patient_id, site_id=state.site_id, arm=s.arm,
                        week=s.visit.week, kind=s.visit.kind, due_date=s.visit.due_date,
                        window_end=s.visit.window_end, detected_at=now)
            for s in state.slots()
            if s.is_open and s.is_dose and s.visit.window_end < today]


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


@dataclass(frozen=True)
class RecordMethotrexateDose:
    dose_id: str
    week: int
    dose_mg: float
    given_at: datetime
    deviation_reason: str | None
    now: datetime


DoseCommand = RecordInfusion | RecordMethotrexateDose


def decide_dose(state: DosingRecord, holds: holding.Holds, command: DoseCommand,
                protocol: ProtocolConfig) -> list[EventData]:
    """The guards on a dose, in order; the dose (and day 0, and any deviation) if all pass."""
    kind: holding.DoseKind = "infusion" if isinstance(command, RecordInfusion) else "methotrexate"
    cur = state.current
    if cur is None or state.patient_id is None or state.site_id is None:
        raise Refused("patient_not_found", "No such patient")
    if state.withdrawn:
        raise Refused("withdrawn", "The patient has withdrawn; no further doses")
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
    held = holding.blocking(holds, state.patient_id, cur.arm, kind)
    if held is not None:
        raise Refused("dosing_held", f"Dosing is held by safety rule {held.rule_id}",
                      rule_id=held.rule_id, hold_id=held.hold_id, scope=held.scope,
                      target=held.target)
    if command.given_at > command.now + CLOCK_SKEW:
        raise Refused("given_in_future", "given_at lies in the future")
    deviations: list[Literal["out_of_window", "dose_mismatch"]] = []
    if isinstance(command, RecordMethotrexateDose):
        low, high = protocol.mtx_dose_range_mg
        if not low <= command.dose_mg <= high:
            raise Refused("dose_out_of_range",
                          f"A methotrexate dose must lie in [{low:g}, {high:g}] mg",
                          dose_mg=command.dose_mg, range_mg=[low, high])
    given_on = command.given_at.date()
    v = slot.visit
    if not calendar.in_window(v, given_on):
        if command.deviation_reason is None:
            raise Refused("out_of_window", f"Week {v.week} is due {v.due_date}, window "
                          f"{v.window_start} to {v.window_end}; give a deviation_reason to "
                          "record it anyway", due_date=str(v.due_date),
                          window_start=str(v.window_start), window_end=str(v.window_end))
        deviations.append("out_of_window")
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
            lot_number=command.lot_number, given_at=command.given_at,
            deviation_reason=command.deviation_reason)]
    else:
        dose_id = command.dose_id
        events = [MethotrexateDoseGiven(
            dose_id=command.dose_id, patient_id=state.patient_id, site_id=state.site_id,
            week=command.week, dose_mg=command.dose_mg, given_at=command.given_at,
            deviation_reason=command.deviation_reason)]
    if command.week == 0 and not cur.day_zero_fixed:
        events.append(DosingScheduleReanchored(
            patient_id=state.patient_id, site_id=state.site_id, arm=cur.arm,
            anchor_date=given_on,
            visits=calendar.reanchor(tuple(s.visit for s in cur.slots), given_on,
                                     min(cur.earliest, given_on), protocol.window_days)))
    if command.deviation_reason is not None:
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
    now: datetime


RecordCommand = GiveDose | StartCalendar | EndForWithdrawal | CrossOver | MarkMissed


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
                return decide_missed(state, command.now)

    return Decider(DosingRecord(), evolve, decide)
