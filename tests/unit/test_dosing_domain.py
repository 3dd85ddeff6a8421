"""Given a patient's dosing events, when a dose is recorded, then these events or this error."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given as given_examples
from hypothesis import settings
from hypothesis import strategies as st

from services.dosing import domain
from services.dosing import holds as holding
from shared.errors import Refused
from shared.events import (
    Arm,
    ArmAssigned,
    ArmCrossedOver,
    DosingHeld,
    DosingScheduleCreated,
    DosingScheduleReanchored,
    EventData,
    InfusionGiven,
    MethotrexateDoseGiven,
    PatientWithdrawn,
    ProtocolDeviationRecorded,
    VisitMissed,
    VisitsCancelled,
)
from shared.protocol import default_protocol
from shared.web import Problem, refusal_problem

PROTOCOL = default_protocol()
RANDOMIZED = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)
NOW = datetime(2027, 6, 1, tzinfo=UTC)
NO_HOLDS = holding.Holds()


def at(day: date, hour: int = 10) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def created(arm: Arm, weight_kg: float = 70.0) -> DosingScheduleCreated:
    return domain.calendar_for(ArmAssigned(
        patient_id="P1", site_id="S1", arm=arm, randomization_number=1, stratum="S1:pasi_lt20",
        baseline_weight_kg=weight_kg, assigned_at=RANDOMIZED), PROTOCOL)


def infusion(week: int, day: date, cells: int = 70_000_000, weight_kg: float = 70.0,
             deviation: str | None = None, now: datetime = NOW) -> domain.RecordInfusion:
    return domain.RecordInfusion(infusion_id=f"inf-{week}", week=week, given_at=at(day),
                                 weight_kg=weight_kg, cells_administered=cells, lot_number="L-1",
                                 deviation_reason=deviation, now=now)


def mtx(week: int, day: date, dose_mg: float = 10.0,
        deviation: str | None = None) -> domain.RecordMethotrexateDose:
    return domain.RecordMethotrexateDose(dose_id=f"mtx-{week}", week=week, dose_mg=dose_mg,
                                         given_at=at(day), deviation_reason=deviation, now=NOW)


def given(history: list[EventData], command: domain.RecordInfusion | domain.RecordMethotrexateDose,
          holds: holding.Holds = NO_HOLDS) -> list[EventData]:
    return domain.decide_dose(domain.fold(history), holds, command, PROTOCOL)


def refused(history: list[EventData],
            command: domain.RecordInfusion | domain.RecordMethotrexateDose,
            holds: holding.Holds = NO_HOLDS) -> Problem:
    """The refusal as the caller gets it (the web layer's one table gives its status)."""
    with pytest.raises(Refused) as caught:
        given(history, command, holds)
    return refusal_problem(caught.value)


def then(history: list[EventData], command: domain.RecordInfusion) -> list[EventData]:
    return history + given(history, command)


# --- windows ----------------------------------------------------------------------------------

WEEK_1_EDGES = [  # week 1 is due 3 December 2026, window 1 to 5 December
    (date(2026, 11, 30), False), (date(2026, 12, 1), True), (date(2026, 12, 5), True),
    (date(2026, 12, 6), False),
]


@pytest.mark.parametrize(("day", "inside"), WEEK_1_EDGES,
                         ids=["day_before", "first_day", "last_day", "day_after"])
def test_week_1_window_edges_before_day_0_is_fixed(day: date, inside: bool) -> None:
    history: list[EventData] = [created("msc_low")]
    if inside:
        assert [type(e) for e in given(history, infusion(1, day))] == [InfusionGiven]
    else:
        problem = refused(history, infusion(1, day))
        assert (problem.status, problem.code) == (422, "out_of_window")
        assert problem.extra["window_start"] == "2026-12-01"
        assert problem.extra["window_end"] == "2026-12-05"


@pytest.mark.parametrize(("day", "inside"), [
    (date(2026, 11, 25), False), (date(2026, 11, 26), True), (date(2026, 11, 28), True),
    (date(2026, 11, 29), False)], ids=["day_before", "first_day", "last_day", "day_after"])
def test_week_0_window_opens_on_the_randomization_day(day: date, inside: bool) -> None:
    history: list[EventData] = [created("mtx")]
    if inside:
        assert isinstance(given(history, mtx(0, day, 7.5))[0], MethotrexateDoseGiven)
    else:
        assert refused(history, mtx(0, day, 7.5)).code == "out_of_window"


@pytest.mark.parametrize(("day", "inside"), [
    (date(2026, 12, 1), False), (date(2026, 12, 2), True), (date(2026, 12, 6), True),
    (date(2026, 12, 7), False)], ids=["day_before", "first_day", "last_day", "day_after"])
def test_the_week_0_dose_fixes_day_0_and_re_dates_every_visit(day: date, inside: bool) -> None:
    week0 = given([created("msc_low")], infusion(0, date(2026, 11, 27)))
    assert [type(e) for e in week0] == [InfusionGiven, DosingScheduleReanchored]
    reanchored = week0[1]
    assert isinstance(reanchored, DosingScheduleReanchored)
    assert reanchored.anchor_date == date(2026, 11, 27)
    by_week = {(v.kind, v.week): v for v in reanchored.visits}
    assert by_week[("infusion", 1)].due_date == date(2026, 12, 4)
    assert by_week[("assessment", 52)].due_date == date(2027, 11, 26)
    history = [created("msc_low"), *week0]
    # Week 1 is now due 4 December, window 2 to 6 December.
    if inside:
        assert [type(e) for e in given(history, infusion(1, day))] == [InfusionGiven]
    else:
        assert refused(history, infusion(1, day)).code == "out_of_window"
    assert domain.fold(history).current.day_zero_fixed  # type: ignore[union-attr]


def test_outside_the_window_with_a_reason_is_a_recorded_deviation() -> None:
    events = given([created("msc_low")], infusion(1, date(2026, 12, 8), deviation="flu, delayed"))
    assert [type(e) for e in events] == [InfusionGiven, ProtocolDeviationRecorded]
    deviation = events[1]
    assert isinstance(deviation, ProtocolDeviationRecorded)
    assert deviation.deviations == ("out_of_window",) and deviation.reason == "flu, delayed"
    assert deviation.dose_event_id == "inf-1" and deviation.week == 1
    assert isinstance(events[0], InfusionGiven) and events[0].deviation_reason == "flu, delayed"


# --- cells ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("cells", "ok"), [
    (63_000_000, True), (77_000_000, True), (62_999_999, False), (77_000_001, False)])
def test_cells_more_than_10_percent_from_planned_are_a_mismatch(cells: int, ok: bool) -> None:
    history: list[EventData] = [created("msc_low")]  # 1e6/kg x 70 kg = 70e6 planned
    if ok:
        event = given(history, infusion(1, date(2026, 12, 3), cells))[0]
        assert isinstance(event, InfusionGiven) and event.cells_per_kg == 1_000_000
    else:
        problem = refused(history, infusion(1, date(2026, 12, 3), cells))
        assert (problem.status, problem.code) == (422, "dose_mismatch")
        assert problem.extra["planned_cells"] == 70_000_000


def test_planned_cells_use_the_weight_at_the_visit() -> None:
    history: list[EventData] = [created("msc_high")]  # planned on 70 kg at baseline
    event = given(history, infusion(1, date(2026, 12, 3), 360_000_000, weight_kg=120.0))[0]
    assert isinstance(event, InfusionGiven) and event.weight_kg == 120.0
    assert refused(history, infusion(1, date(2026, 12, 3), 210_000_000, weight_kg=120.0)
                   ).code == "dose_mismatch"
    events = given(history, infusion(1, date(2026, 12, 3), 1_000_000, deviation="short lot"))
    assert isinstance(events[1], ProtocolDeviationRecorded)
    assert events[1].deviations == ("dose_mismatch",)


# --- the other guards -------------------------------------------------------------------------

def test_a_visit_is_given_once() -> None:
    history = then([created("msc_low")], infusion(0, date(2026, 11, 26)))
    problem = refused(history, infusion(0, date(2026, 11, 26)))
    assert (problem.status, problem.code) == (409, "already_given")


def test_no_dose_after_withdrawal() -> None:
    history: list[EventData] = [created("msc_low")]
    history += domain.decide_withdrawal(domain.fold(history), PatientWithdrawn(
        patient_id="P1", site_id="S1", reason="moved away", withdrawn_at=RANDOMIZED))
    problem = refused(history, infusion(0, date(2026, 11, 26)))
    assert (problem.status, problem.code) == (409, "withdrawn")


def test_the_wrong_arm_and_a_week_without_a_dose_are_refused() -> None:
    assert refused([created("msc_low")], mtx(0, date(2026, 11, 26))).code == "wrong_arm"
    problem = refused([created("mtx")], infusion(0, date(2026, 11, 26)))
    assert (problem.status, problem.code, problem.extra["arm"]) == (422, "wrong_arm", "mtx")
    problem = refused([created("msc_high")], infusion(4, date(2026, 12, 24)))
    assert (problem.status, problem.code) == (422, "not_a_dosing_week")
    assert refused([created("mtx")], mtx(16, date(2027, 3, 18))).code == "not_a_dosing_week"


@pytest.mark.parametrize(("dose_mg", "ok"), [(4.99, False), (5.0, True), (25.0, True),
                                             (25.01, False), (-10.0, False)])
def test_methotrexate_must_lie_in_5_to_25_mg(dose_mg: float, ok: bool) -> None:
    history: list[EventData] = [created("mtx")]
    if ok:
        event = given(history, mtx(3, date(2026, 12, 17), dose_mg))[0]
        assert isinstance(event, MethotrexateDoseGiven) and event.dose_mg == dose_mg
    else:
        for reason in (None, "investigator's choice"):  # no reason makes it acceptable
            problem = refused(history, mtx(3, date(2026, 12, 17), dose_mg, reason))
            assert (problem.status, problem.code) == (422, "dose_out_of_range")


def test_a_dose_in_the_future_is_refused() -> None:
    problem = refused([created("msc_low")], infusion(0, date(2026, 11, 26),
                                                     now=RANDOMIZED - timedelta(days=1)))
    assert (problem.status, problem.code) == (422, "given_in_future")


def held(scope: str, target: str, product: str = "any", hold_id: str = "H1") -> holding.Holds:
    return holding.fold([DosingHeld.model_validate(
        {"scope": scope, "target": target, "rule_id": "R4-infusion-reaction",
         "hold_id": hold_id, "product": product})])


@pytest.mark.parametrize(("holds", "blocked"), [
    (held("patient", "P1"), True), (held("patient", "P2"), False),
    (held("patient", "P1", "infusion"), True), (held("patient", "P1", "methotrexate"), False),
    (held("arm", "msc_low"), True), (held("arm", "msc_high"), False),
    (held("trial", "NCT03424629"), True)])
def test_a_hold_in_scope_refuses_the_dose_naming_its_rule(holds: holding.Holds,
                                                          blocked: bool) -> None:
    history: list[EventData] = [created("msc_low")]
    if blocked:
        problem = refused(history, infusion(0, date(2026, 11, 26)), holds)
        assert (problem.status, problem.code) == (409, "dosing_held")
        assert problem.extra["rule_id"] == "R4-infusion-reaction"
        assert problem.extra["hold_id"] == "H1"
    else:
        assert isinstance(given(history, infusion(0, date(2026, 11, 26)), holds)[0],
                          InfusionGiven)


# --- missed, withdrawn, crossed over ----------------------------------------------------------

def test_a_closed_window_is_missed_once() -> None:
    history: list[EventData] = [created("msc_low")]
    # Week 0's window ends 28 November: on that day it is still open.
    assert domain.decide_missed(domain.fold(history), at(date(2026, 11, 28), 23)) == []
    missed = domain.decide_missed(domain.fold(history), at(date(2026, 11, 29)))
    assert [(e.week, e.kind) for e in missed if isinstance(e, VisitMissed)] == [(0, "infusion")]
    history += missed
    assert domain.decide_missed(domain.fold(history), at(date(2026, 11, 29), 23)) == []
    # Assessments are not doses: they are never "missed" by this service.
    later = domain.decide_missed(domain.fold(history), at(date(2027, 12, 31)))
    assert sorted(e.week for e in later if isinstance(e, VisitMissed)) == [1, 2, 3, 5, 7]


def test_a_missed_visit_can_still_be_given_late_as_a_deviation() -> None:
    history: list[EventData] = [created("msc_low")]
    history += domain.decide_missed(domain.fold(history), at(date(2026, 11, 29)))
    assert refused(history, infusion(0, date(2026, 11, 30))).code == "out_of_window"
    events = given(history, infusion(0, date(2026, 11, 30), deviation="patient was ill"))
    assert [type(e) for e in events] == [InfusionGiven, DosingScheduleReanchored,
                                         ProtocolDeviationRecorded]


def test_withdrawal_cancels_every_visit_not_done() -> None:
    history = then([created("msc_low")], infusion(0, date(2026, 11, 26)))
    cancelled = domain.decide_withdrawal(domain.fold(history), PatientWithdrawn(
        patient_id="P1", site_id="S1", reason="moved away", withdrawn_at=RANDOMIZED))
    assert len(cancelled) == 1 and isinstance(cancelled[0], VisitsCancelled)
    assert cancelled[0].cause == "withdrawn"
    assert len(cancelled[0].visits) == 6 + 8 - 1  # all but the given week-0 infusion
    record = domain.fold(history + cancelled)
    assert [s.status for s in record.slots() if s.visit.kind == "infusion"] == [
        "given", "cancelled", "cancelled", "cancelled", "cancelled", "cancelled"]
    assert domain.decide_withdrawal(record, PatientWithdrawn(
        patient_id="P1", site_id="S1", reason="again", withdrawn_at=RANDOMIZED)) == []
    assert domain.decide_missed(record, at(date(2028, 1, 1))) == []


def test_crossover_cancels_the_old_arms_doses_and_plans_the_new_arm() -> None:
    history = then([created("msc_low")], infusion(0, date(2026, 11, 26)))
    crossed = ArmCrossedOver(patient_id="P1", site_id="S1", from_arm="msc_low", to_arm="mtx",
                             reason="no response",
                             crossed_over_at=datetime(2026, 12, 2, 8, tzinfo=UTC))
    events = domain.decide_crossover(domain.fold(history), crossed, PROTOCOL)
    assert [e.event_type() for e in events] == ["VisitsCancelled", "DosingScheduleCreated"]
    cancelled, new = events
    assert isinstance(cancelled, VisitsCancelled) and isinstance(new, DosingScheduleCreated)
    assert cancelled.cause == "crossover" and cancelled.arm == "msc_low"
    assert [v.week for v in cancelled.visits] == [1, 2, 3, 5, 7]
    assert new.arm == "mtx" and new.anchor_date == date(2026, 12, 2)
    assert {v.kind for v in new.visits} == {"methotrexate"} and len(new.visits) == 16
    history += events
    record = domain.fold(history)
    assert record.current is not None and record.current.arm == "mtx"
    assert refused(history, infusion(1, date(2026, 12, 3))).code == "wrong_arm"
    assert isinstance(given(history, mtx(0, date(2026, 12, 2), 7.5))[0], MethotrexateDoseGiven)
    # The follow-up assessments keep the first calendar's day 0.
    assessments = [s for s in record.slots() if s.visit.kind == "assessment"]
    assert len(assessments) == 8 and all(s.status == "planned" for s in assessments)
    assert domain.decide_crossover(record, crossed, PROTOCOL) == []  # already on the new arm


@settings(max_examples=60, deadline=None)
@given_examples(given_weeks=st.sets(st.sampled_from([0, 1, 2, 3, 5, 7])),
       sweep_days=st.lists(st.integers(min_value=0, max_value=80), min_size=1, max_size=8))
def test_sweeps_in_any_order_miss_each_visit_not_given_once(given_weeks: set[int],
                                                            sweep_days: list[int]) -> None:
    history: list[EventData] = [created("msc_low")]
    for week in sorted(given_weeks):  # each given on time, on its due day
        due = RANDOMIZED.date() + timedelta(days=7 * week)
        history = then(history, infusion(week, due, now=at(due, 23)))
    for day in sweep_days:
        history += domain.decide_missed(domain.fold(history), RANDOMIZED + timedelta(days=day))
    missed = [e.week for e in history if isinstance(e, VisitMissed)]
    assert len(missed) == len(set(missed)) and not set(missed) & given_weeks
    last = RANDOMIZED.date() + timedelta(days=max(sweep_days))
    closed = {s.visit.week for s in domain.fold(history[:1]).slots()
              if s.visit.kind == "infusion" and s.visit.window_end < last}
    assert set(missed) == closed - given_weeks
