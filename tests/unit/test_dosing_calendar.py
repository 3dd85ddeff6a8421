"""The dosing calendar of an assigned patient under the default protocol, checked by hand."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from services.dosing.domain import calendar
from shared.events import Arm, ArmAssigned, DosingScheduleCreated, PlannedVisit
from shared.protocol import default_protocol

ANCHOR = date(2026, 11, 26)
INFUSION_WEEKS = [0, 1, 2, 3, 5, 7]
ASSESSMENT_WEEKS = [0, 4, 8, 12, 16, 24, 36, 52]
MTX_TITRATION = [7.5, 10, 12.5] + [15.0] * 13


def schedule(arm: Arm, weight_kg: float = 70.0, assigned_at: datetime | None = None) -> DosingScheduleCreated:
    assigned = ArmAssigned(patient_id="p-1", site_id="S1", arm=arm, randomization_number=1,
                           stratum="S1:pasi_lt20", baseline_weight_kg=weight_kg,
                           assigned_at=assigned_at or datetime(2026, 11, 26, 9, 30, tzinfo=UTC))
    return calendar(assigned, default_protocol())


def of_kind(created: DosingScheduleCreated, kind: str) -> list[PlannedVisit]:
    return [v for v in created.visits if v.kind == kind]


@pytest.mark.parametrize(("arm", "weight_kg", "cells"), [
    ("msc_low", 50.0, 50_000_000),
    ("msc_low", 70.5, 70_500_000),
    ("msc_low", 120.0, 120_000_000),
    ("msc_high", 50.0, 150_000_000),
    ("msc_high", 70.0, 210_000_000),  # the protocol's own example: 2.1 x 10^8
    ("msc_high", 70.5, 211_500_000),
    ("msc_high", 120.0, 360_000_000),
])
def test_infusions_at_weeks_0_1_2_3_5_7_with_cells_per_kg_times_weight(
        arm: Arm, weight_kg: float, cells: int) -> None:
    created = schedule(arm, weight_kg)
    infusions = of_kind(created, "infusion")
    assert [v.week for v in infusions] == INFUSION_WEEKS
    assert all(v.planned_cells == cells for v in infusions)
    assert all(isinstance(v.planned_cells, int) for v in infusions)
    assert all(v.product == "UC-MSC" and v.planned_dose_mg is None for v in infusions)
    assert of_kind(created, "methotrexate") == []


def test_mtx_has_16_weekly_titrated_doses() -> None:
    created = schedule("mtx")
    doses = of_kind(created, "methotrexate")
    assert [v.week for v in doses] == list(range(16))
    assert [v.planned_dose_mg for v in doses] == MTX_TITRATION
    low, high = default_protocol().mtx_dose_range_mg
    assert (low, high) == (5, 25)
    assert all(v.planned_dose_mg is not None and low <= v.planned_dose_mg <= high for v in doses)
    assert all(v.product == "methotrexate" and v.planned_cells is None for v in doses)
    assert of_kind(created, "infusion") == []


@pytest.mark.parametrize("arm", ["msc_low", "msc_high", "mtx"])
def test_assessments_at_weeks_0_to_52(arm: Arm) -> None:
    created = schedule(arm)
    assessments = of_kind(created, "assessment")
    assert [v.week for v in assessments] == ASSESSMENT_WEEKS
    assert all(v.planned_cells is None and v.planned_dose_mg is None for v in assessments)


@pytest.mark.parametrize("arm", ["msc_low", "msc_high", "mtx"])
def test_every_visit_is_due_on_day_7n_with_a_2_day_window(arm: Arm) -> None:
    created = schedule(arm)
    assert created.anchor_date == ANCHOR
    assert (created.patient_id, created.site_id, created.arm) == ("p-1", "S1", arm)
    for v in created.visits:
        assert v.due_date == ANCHOR + timedelta(days=7 * v.week)
        assert v.window_start == v.due_date - timedelta(days=2)
        assert v.window_end == v.due_date + timedelta(days=2)


def test_week_5_dates_across_the_year_end() -> None:
    week5 = [v for v in schedule("msc_high").visits if v.week == 5]
    assert len(week5) == 1
    assert (week5[0].due_date, week5[0].window_start, week5[0].window_end) == (
        date(2026, 12, 31), date(2026, 12, 29), date(2027, 1, 2))


def test_week_52_assessment_date() -> None:
    (week52,) = [v for v in schedule("mtx").visits if v.week == 52]
    assert week52.due_date == date(2027, 11, 25)


def test_visits_are_in_week_order_with_the_assessment_first() -> None:
    visits = schedule("msc_low").visits
    assert len(visits) == len(INFUSION_WEEKS) + len(ASSESSMENT_WEEKS)
    assert [v.week for v in visits] == sorted(v.week for v in visits)
    week0 = [v.kind for v in visits if v.week == 0]
    assert week0 == ["assessment", "infusion"]
    assert len(schedule("mtx").visits) == 16 + len(ASSESSMENT_WEEKS)


def test_anchor_is_the_assignment_day() -> None:
    created = schedule("msc_low", assigned_at=datetime(2027, 2, 28, 23, 59, tzinfo=UTC))
    assert created.anchor_date == date(2027, 2, 28)
    assert of_kind(created, "infusion")[1].due_date == date(2027, 3, 7)


def test_schedule_round_trips_as_event_data() -> None:
    created = schedule("msc_high", 70.5)
    assert DosingScheduleCreated.model_validate(created.model_dump(mode="json")) == created
