"""Pure visit calendar: which visits an arm has, when each falls due, and its window. No I/O."""

from __future__ import annotations

from datetime import date, timedelta

from shared.events import Arm, PlannedVisit
from shared.protocol import ProtocolConfig


def planned_cells(cells_per_kg: float, weight_kg: float) -> int:
    """Total cells for one infusion: dose per kg x the weight at the visit."""
    return round(cells_per_kg * weight_kg)


def visit(week: int, kind: str, anchor: date, earliest: date, window_days: int,
          **planned: object) -> PlannedVisit:
    """Week N falls due on day 7N after the anchor, +/- the window; never before `earliest`
    (the randomization or crossover day: no dose before the patient is in the arm)."""
    due = anchor + timedelta(days=7 * week)
    return PlannedVisit.model_validate({
        "week": week, "kind": kind, "due_date": due,
        "window_start": max(due - timedelta(days=window_days), earliest),
        "window_end": due + timedelta(days=window_days), **planned})


def plan(arm_id: Arm, protocol: ProtocolConfig, anchor: date, earliest: date, weight_kg: float,
         assessments: bool = True) -> tuple[PlannedVisit, ...]:
    """Every planned dose of the arm (and, unless told otherwise, every assessment to week 52)."""
    arm = protocol.arms[arm_id]
    w = protocol.window_days
    visits: list[PlannedVisit] = []
    if arm.kind == "infusion":
        assert arm.cells_per_kg is not None  # the protocol validator guarantees it
        cells = planned_cells(arm.cells_per_kg, weight_kg)
        visits += [visit(week, "infusion", anchor, earliest, w, product=arm.product,
                         planned_cells=cells) for week in arm.dose_weeks]
    else:
        assert arm.mtx_titration_mg is not None
        visits += [visit(week, "methotrexate", anchor, earliest, w, product=arm.product,
                         planned_dose_mg=dose)
                   for week, dose in zip(arm.dose_weeks, arm.mtx_titration_mg, strict=True)]
    if assessments:
        visits += [visit(week, "assessment", anchor, earliest, w)
                   for week in protocol.assessment_weeks]
    visits.sort(key=lambda v: (v.week, v.kind != "assessment"))
    return tuple(visits)


def reanchor(visits: tuple[PlannedVisit, ...], day_zero: date, earliest: date,
             window_days: int) -> tuple[PlannedVisit, ...]:
    """The same visits, re-dated from day 0 (the week-0 dose)."""
    return tuple(
        visit(v.week, v.kind, day_zero, earliest, window_days,
              **v.model_dump(include={"product", "planned_cells", "planned_dose_mg"}))
        for v in visits)


def in_window(v: PlannedVisit, day: date) -> bool:
    return v.window_start <= day <= v.window_end
