"""Pure dosing domain: the visit calendar of an assigned patient. No I/O."""

from __future__ import annotations

from datetime import date, timedelta

from shared.events import ArmAssigned, DosingScheduleCreated, PlannedVisit
from shared.protocol import ProtocolConfig


def visit(week: int, kind: str, anchor: date, window_days: int, **planned: object) -> PlannedVisit:
    due = anchor + timedelta(days=7 * week)
    return PlannedVisit.model_validate({
        "week": week, "kind": kind, "due_date": due,
        "window_start": due - timedelta(days=window_days),
        "window_end": due + timedelta(days=window_days), **planned})


def calendar(assigned: ArmAssigned, protocol: ProtocolConfig) -> DosingScheduleCreated:
    """Every planned dose and assessment, anchored to the assignment day until day 0 is known."""
    arm = protocol.arms[assigned.arm]
    anchor = assigned.assigned_at.date()
    w = protocol.window_days
    visits: list[PlannedVisit] = []
    if arm.kind == "infusion":
        assert arm.cells_per_kg is not None
        cells = round(arm.cells_per_kg * assigned.baseline_weight_kg)
        visits += [visit(week, "infusion", anchor, w, product=arm.product, planned_cells=cells)
                   for week in arm.dose_weeks]
    else:
        assert arm.mtx_titration_mg is not None
        visits += [visit(week, "methotrexate", anchor, w, product=arm.product,
                         planned_dose_mg=dose)
                   for week, dose in zip(arm.dose_weeks, arm.mtx_titration_mg, strict=True)]
    visits += [visit(week, "assessment", anchor, w) for week in protocol.assessment_weeks]
    visits.sort(key=lambda v: (v.week, v.kind != "assessment"))
    return DosingScheduleCreated(patient_id=assigned.patient_id, site_id=assigned.site_id,
                                 arm=assigned.arm, anchor_date=anchor, visits=tuple(visits))
