"""The visit calendar of each arm under the default protocol, against tables computed by hand."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest

from services.dosing.domain import calendar_for
from shared.events import Arm, ArmAssigned, DosingScheduleCreated, PlannedVisit
from shared.protocol import default_protocol

D = date  # tables read better with a short name

# Randomized on Thursday 26 November 2026: week N is due on day 7N, +/- 2 days, and no visit
# opens before the randomization day (so week 0's window starts on it).
INFUSIONS = [  # week, due, window start, window end
    (0, D(2026, 11, 26), D(2026, 11, 26), D(2026, 11, 28)),
    (1, D(2026, 12, 3), D(2026, 12, 1), D(2026, 12, 5)),
    (2, D(2026, 12, 10), D(2026, 12, 8), D(2026, 12, 12)),
    (3, D(2026, 12, 17), D(2026, 12, 15), D(2026, 12, 19)),
    (5, D(2026, 12, 31), D(2026, 12, 29), D(2027, 1, 2)),
    (7, D(2027, 1, 14), D(2027, 1, 12), D(2027, 1, 16)),
]
METHOTREXATE = [  # week, due, planned mg: 7.5, 10, 12.5, then 15 mg to week 15
    (0, D(2026, 11, 26), 7.5), (1, D(2026, 12, 3), 10.0), (2, D(2026, 12, 10), 12.5),
    (3, D(2026, 12, 17), 15.0), (4, D(2026, 12, 24), 15.0), (5, D(2026, 12, 31), 15.0),
    (6, D(2027, 1, 7), 15.0), (7, D(2027, 1, 14), 15.0), (8, D(2027, 1, 21), 15.0),
    (9, D(2027, 1, 28), 15.0), (10, D(2027, 2, 4), 15.0), (11, D(2027, 2, 11), 15.0),
    (12, D(2027, 2, 18), 15.0), (13, D(2027, 2, 25), 15.0), (14, D(2027, 3, 4), 15.0),
    (15, D(2027, 3, 11), 15.0),
]
ASSESSMENTS = [
    (0, D(2026, 11, 26)), (4, D(2026, 12, 24)), (8, D(2027, 1, 21)), (12, D(2027, 2, 18)),
    (16, D(2027, 3, 18)), (24, D(2027, 5, 13)), (36, D(2027, 8, 5)), (52, D(2027, 11, 25)),
]
CELLS = [  # arm, weight, cells per infusion = cells/kg x kg
    ("msc_low", 50.0, 50_000_000), ("msc_low", 70.5, 70_500_000),
    ("msc_low", 120.0, 120_000_000),
    ("msc_high", 50.0, 150_000_000), ("msc_high", 70.5, 211_500_000),
    ("msc_high", 120.0, 360_000_000),
    ("msc_high", 70.0, 210_000_000),  # the protocol's own example: 2.1 x 10^8
]


def schedule(arm: Arm, weight_kg: float = 70.0,
             assigned_at: datetime = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)
             ) -> DosingScheduleCreated:
    assigned = ArmAssigned(patient_id="p-1", site_id="S1", arm=arm, randomization_number=1,
                           stratum="S1:pasi_lt20", baseline_weight_kg=weight_kg,
                           assigned_at=assigned_at)
    return calendar_for(assigned, default_protocol())


def of_kind(created: DosingScheduleCreated, kind: str) -> list[PlannedVisit]:
    return [v for v in created.visits if v.kind == kind]


@pytest.mark.parametrize("arm", ["msc_low", "msc_high"])
def test_infusion_arms_match_the_hand_computed_table(arm: Arm) -> None:
    infusions = of_kind(schedule(arm), "infusion")
    assert [(v.week, v.due_date, v.window_start, v.window_end) for v in infusions] == INFUSIONS
    assert all(v.product == "UC-MSC" and v.planned_dose_mg is None for v in infusions)
    assert of_kind(schedule(arm), "methotrexate") == []


@pytest.mark.parametrize(("arm", "weight_kg", "cells"), CELLS)
def test_cells_are_cells_per_kg_times_weight_on_each_dose_level(
        arm: Arm, weight_kg: float, cells: int) -> None:
    created = schedule(arm, weight_kg)
    assert [v.planned_cells for v in of_kind(created, "infusion")] == [cells] * 6
    assert created.weight_kg == weight_kg


def test_methotrexate_matches_the_hand_computed_titration_table() -> None:
    doses = of_kind(schedule("mtx"), "methotrexate")
    assert [(v.week, v.due_date, v.planned_dose_mg) for v in doses] == METHOTREXATE
    assert all(v.product == "methotrexate" and v.planned_cells is None for v in doses)
    low, high = default_protocol().mtx_dose_range_mg
    assert (low, high) == (5, 25)
    assert all(v.planned_dose_mg is not None and low <= v.planned_dose_mg <= high for v in doses)
    assert of_kind(schedule("mtx"), "infusion") == []


@pytest.mark.parametrize("arm", ["msc_low", "msc_high", "mtx"])
def test_assessments_to_week_52_match_the_hand_computed_table(arm: Arm) -> None:
    assessments = of_kind(schedule(arm), "assessment")
    assert [(v.week, v.due_date) for v in assessments] == ASSESSMENTS
    assert all(v.planned_cells is None and v.planned_dose_mg is None for v in assessments)
    week52 = assessments[-1]
    assert (week52.window_start, week52.window_end) == (D(2027, 11, 23), D(2027, 11, 27))


def test_visits_are_in_week_order_with_the_assessment_first() -> None:
    visits = schedule("msc_low").visits
    assert len(visits) == 6 + 8
    assert [v.week for v in visits] == sorted(v.week for v in visits)
    assert [v.kind for v in visits if v.week == 0] == ["assessment", "infusion"]
    assert len(schedule("mtx").visits) == 16 + 8


def test_until_day_0_dates_count_from_the_randomization_day() -> None:
    late = datetime(2027, 2, 28, 23, 59, tzinfo=ZoneInfo("Asia/Shanghai"))
    created = schedule("msc_low", assigned_at=late)
    assert created.anchor_date == D(2027, 2, 28)
    assert [v.due_date for v in of_kind(created, "infusion")][:2] == [D(2027, 2, 28),
                                                                      D(2027, 3, 7)]


def test_the_randomization_day_is_the_sites_own_date() -> None:
    """Defect 4: 23:59 UTC on 28 February is already 1 March at the sites (Asia/Shanghai)."""
    created = schedule("msc_low", assigned_at=datetime(2027, 2, 28, 23, 59, tzinfo=UTC))
    assert created.anchor_date == D(2027, 3, 1)


def test_schedule_round_trips_as_event_data() -> None:
    created = schedule("msc_high", 70.5)
    assert DosingScheduleCreated.model_validate(created.model_dump(mode="json")) == created
