"""Given a patient's dosing events, when a dose is recorded, then these events or this error."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone

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
    ArmSuspended,
    DosingHeld,
    DosingResumed,
    DosingScheduleCreated,
    DosingScheduleReanchored,
    EventData,
    InfusionGiven,
    MethotrexateDoseGiven,
    PatientWithdrawn,
    ProtocolDeviationRecorded,
    SafetyHoldLifted,
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
             deviation: str | None = None, now: datetime = NOW,
             weight_confirmed: bool = False) -> domain.RecordInfusion:
    return domain.RecordInfusion(infusion_id=f"inf-{week}", week=week, given_at=at(day),
                                 weight_kg=weight_kg, cells_administered=cells, lot_number="L-1",
                                 deviation_reason=deviation, now=now,
                                 weight_confirmed=weight_confirmed)


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


def missed_on(record: domain.DosingRecord, now: datetime) -> list[EventData]:
    """The sweep on `now`, with no hold in force."""
    return domain.decide_missed(record, now, PROTOCOL)


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
        assert refused(history, mtx(0, day, 7.5)).code == (
            "given_before_assignment" if day < RANDOMIZED.date() else "out_of_window")


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
    event = given(history, infusion(1, date(2026, 12, 3), 360_000_000, weight_kg=120.0,
                                    weight_confirmed=True))[0]
    assert isinstance(event, InfusionGiven) and event.weight_kg == 120.0
    assert refused(history, infusion(1, date(2026, 12, 3), 210_000_000, weight_kg=120.0,
                                     weight_confirmed=True)).code == "dose_mismatch"
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
    if ok:  # within the range; above the titration scheme only as a deviation (defect 7)
        event = given(history, mtx(3, date(2026, 12, 17), dose_mg, "investigator's choice"))[0]
        assert isinstance(event, MethotrexateDoseGiven) and event.dose_mg == dose_mg
    else:
        for reason in (None, "investigator's choice"):  # no reason makes it acceptable
            problem = refused(history, mtx(3, date(2026, 12, 17), dose_mg, reason))
            assert (problem.status, problem.code) == (422, "dose_out_of_range")


def test_a_dose_in_the_future_is_refused() -> None:
    problem = refused([created("msc_low")], infusion(0, date(2026, 11, 26),
                                                     now=RANDOMIZED - timedelta(days=1)))
    assert (problem.status, problem.code) == (422, "given_in_future")


@pytest.mark.parametrize("reason", [None, "site's calendar error"])
def test_a_dose_dated_before_the_randomization_day_is_refused_whatever_the_reason(
        reason: str | None) -> None:
    """Day 0 is on or after the randomization day: a dose before it would also move day 0, and
    every visit with it, to before the patient had an arm."""
    doses: list[tuple[list[EventData], domain.DoseCommand]] = [
        ([created("msc_low")], infusion(0, date(2026, 11, 25), deviation=reason)),
        ([created("mtx")], mtx(0, date(2026, 11, 21), 7.5, reason))]
    for history, dose in doses:
        problem = refused(history, dose)
        assert (problem.status, problem.code) == (422, "given_before_assignment")
        assert problem.extra["assigned_on"] == "2026-11-26"


def held(scope: str, target: str, product: str = "any", hold_id: str = "H1") -> holding.Holds:
    return holding.fold([DosingHeld.model_validate(
        {"scope": scope, "target": target, "rule_id": "R4-infusion-reaction",
         "hold_id": hold_id, "product": product})])


def test_a_dose_given_under_a_hold_and_entered_after_its_lift_is_still_refused() -> None:
    """D95. The hold's span is kept when it is lifted: a dose given while it was in force is
    refused whenever it is entered, as it was while the hold stood; before or after the span,
    the dose is given."""
    suspended = ArmSuspended(hold_id="H1", arm="msc_low", rule_id="R3-arm-toxicity")
    lift = SafetyHoldLifted(hold_id="H1", scope="arm", target="msc_low",
                                    rationale="reviewed", decided_by="dsmb-chair")
    holds = holding.Holds()
    for notice, when in ((suspended, at(date(2026, 11, 26), 12)),
                         (lift, at(date(2026, 11, 28), 9))):
        holds = holding.evolve(holds, *holding.decide(holds, notice, when))
    assert holds.active == {}
    history: list[EventData] = [created("msc_low")]
    problem = refused(history, infusion(0, date(2026, 11, 27)), holds)  # at 10:00, under it
    assert (problem.status, problem.code, problem.extra["hold_id"]) == (409, "dosing_held", "H1")
    assert "was, when this dose was given," in problem.title
    after = given(history, infusion(0, date(2026, 11, 28)), holds)  # 10:00, after the lift
    assert isinstance(after[0], InfusionGiven) and after[0].late_entry is False
    before = holding.Holds(lifted=((holds.lifted[0][0].model_copy(
        update={"held_from": at(date(2026, 11, 27), 12)}), holds.lifted[0][1]),))
    assert isinstance(given(history, infusion(0, date(2026, 11, 27)), before)[0], InfusionGiven)
    # A resumption recorded before D95 kept no span: nothing to refuse by.
    old = holding.evolve(holding.evolve(holding.Holds(), holding.decide(
        holding.Holds(), suspended, at(date(2026, 11, 26), 12))[0]), DosingResumed(
        scope="arm", target="msc_low", rule_id="R3-arm-toxicity", hold_id="H1"))
    assert old.lifted == () and old.active == {}


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
    # Week 0's window ends 28 November: on that day it is still open (15:00 UTC is 23:00 at
    # the sites, Asia/Shanghai), and closed the next day at the site, not the next UTC day.
    assert missed_on(domain.fold(history), at(date(2026, 11, 28), 15)) == []
    assert missed_on(domain.fold(history), at(date(2026, 11, 28), 17)) != []
    missed = missed_on(domain.fold(history), at(date(2026, 11, 29)))
    assert [(e.week, e.kind) for e in missed if isinstance(e, VisitMissed)] == [(0, "infusion")]
    history += missed
    assert missed_on(domain.fold(history), at(date(2026, 11, 29), 23)) == []
    # Assessments are not doses: they are never "missed" by this service.
    later = missed_on(domain.fold(history), at(date(2027, 12, 31)))
    assert sorted(e.week for e in later if isinstance(e, VisitMissed)) == [1, 2, 3, 5, 7]


def test_a_missed_visit_can_still_be_given_late_as_a_deviation() -> None:
    history: list[EventData] = [created("msc_low")]
    history += missed_on(domain.fold(history), at(date(2026, 11, 29)))
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
    assert missed_on(record, at(date(2028, 1, 1))) == []


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
        history += missed_on(domain.fold(history), RANDOMIZED + timedelta(days=day))
    missed = [e.week for e in history if isinstance(e, VisitMissed)]
    assert len(missed) == len(set(missed)) and not set(missed) & given_weeks
    last = RANDOMIZED.date() + timedelta(days=max(sweep_days))
    closed = {s.visit.week for s in domain.fold(history[:1]).slots()
              if s.visit.kind == "infusion" and s.visit.window_end < last}
    assert set(missed) == closed - given_weeks


# --- the audit's dosing defects (issue 10, items 4 to 9) --------------------------------------


def verdict(history: list[EventData], command: domain.DoseCommand,
            holds: holding.Holds = NO_HOLDS) -> str:
    try:
        return given(history, command, holds)[0].event_type()
    except Refused as refusal:
        return refusal.code


@settings(max_examples=300, deadline=None)
@given_examples(minutes=st.integers(0, 60 * 24 * 14), offset=st.integers(-12 * 60, 14 * 60))
def test_the_window_verdict_does_not_depend_on_the_offset_given_at_is_written_in(
        minutes: int, offset: int) -> None:
    """Defect 4: 2026-11-28T20:00Z was in window and 2026-11-29T04:00+08:00, the same instant,
    out of it. Windows are calendar days at the site; given_at is kept in UTC."""
    instant = RANDOMIZED + timedelta(minutes=minutes)
    history: list[EventData] = [created("msc_low")]
    written = [replace(infusion(1, date(2026, 12, 3)), given_at=instant.astimezone(zone))
               for zone in (UTC, timezone(timedelta(minutes=offset)))]
    assert verdict(history, written[0]) == verdict(history, written[1])
    if verdict(history, written[1]) == "InfusionGiven":
        recorded = given(history, written[1])[0]
        assert isinstance(recorded, InfusionGiven)
        assert recorded.given_at == instant and recorded.given_at.utcoffset() == timedelta(0)


def test_the_audit_example_instant_is_judged_at_the_site() -> None:
    history: list[EventData] = [created("msc_low")]  # week 0's window: 26 to 28 November
    for written in ("2026-11-28T20:00:00+00:00", "2026-11-29T04:00:00+08:00"):
        command = replace(infusion(0, date(2026, 11, 28)), given_at=datetime.fromisoformat(written))
        assert verdict(history, command) == "out_of_window"  # 29 November at the sites
    early = replace(infusion(0, date(2026, 11, 28)),
                    given_at=datetime.fromisoformat("2026-11-28T15:00:00+00:00"))
    assert verdict(history, early) == "InfusionGiven"  # 23:00 on the 28th at the sites


def held_from(at_: datetime | None, scope: str = "patient", target: str = "P1") -> holding.Holds:
    return holding.fold([DosingHeld.model_validate(
        {"scope": scope, "target": target, "rule_id": "R4-infusion-reaction", "hold_id": "H9",
         "held_from": at_})])


def test_a_dose_given_before_a_hold_but_entered_after_it_is_a_late_entry() -> None:
    """Defect 5: such a dose was refused (dosing_held) and could never be recorded."""
    history: list[EventData] = [created("msc_low")]
    hold = held_from(at(date(2026, 11, 27)))  # took effect at 10:00 UTC on the 27th
    before = given(history, infusion(0, date(2026, 11, 26)), hold)[0]
    assert isinstance(before, InfusionGiven)
    assert (before.late_entry, before.entered_after_hold) == (True, "H9")
    after = refused(history, infusion(0, date(2026, 11, 27)), hold)  # 10:00 too: held
    assert (after.status, after.code) == (409, "dosing_held")
    # A hold whose start is unknown stops every dose: the system cannot tell, so it refuses.
    assert refused(history, infusion(0, date(2026, 11, 26)), held_from(None)).code == "dosing_held"
    plain = given(history, infusion(0, date(2026, 11, 26)))[0]
    assert isinstance(plain, InfusionGiven) and not plain.late_entry


def test_a_visit_whose_window_closes_under_a_hold_is_held_not_missed() -> None:
    """Defect 6: held visits turned into missed visits when the sweep passed them."""
    history: list[EventData] = [created("msc_low")]
    swept = domain.decide_missed(domain.fold(history), at(date(2026, 11, 29)), PROTOCOL,
                                 held_from(at(date(2026, 11, 26))))
    assert [(e.event_type(), e.week) for e in swept] == [("VisitHeld", 0)]  # type: ignore[attr-defined]
    record = domain.fold(history + swept)
    assert [s.status for s in record.slots() if s.visit.kind == "infusion"][:2] == [
        "held", "planned"]
    assert missed_on(record, at(date(2026, 11, 30))) == []  # once


def test_re_anchoring_re_plans_every_visit_not_yet_given() -> None:
    """Defect 6: a visit swept as missed stayed missed after a late week-0 dose re-dated it
    into the future."""
    history: list[EventData] = [created("msc_low")]
    history += missed_on(domain.fold(history), at(date(2026, 12, 7)))  # weeks 0 and 1 missed
    history = then(history, infusion(0, date(2026, 12, 7), deviation="patient was travelling"))
    week_1 = next(s for s in domain.fold(history).slots()
                  if (s.visit.kind, s.visit.week) == ("infusion", 1))
    assert (week_1.status, week_1.visit.due_date) == ("planned", date(2026, 12, 14))
    assert verdict(history, infusion(1, date(2026, 12, 14))) == "InfusionGiven"


def test_methotrexate_escalation_beyond_the_titration_scheme_is_refused() -> None:
    """Defect 7: 5 mg one week and 25 mg the next was accepted."""
    history: list[EventData] = [created("mtx")]
    history += given(history, mtx(0, date(2026, 11, 26), 5.0))
    problem = refused(history, mtx(1, date(2026, 12, 3), 25.0))
    assert (problem.status, problem.code, problem.extra["max_step_mg"]) == (
        422, "dose_step_exceeded", 2.5)
    assert refused(history, mtx(1, date(2026, 12, 3), 10.0)).code == "dose_step_exceeded"  # +5
    assert verdict(history, mtx(1, date(2026, 12, 3), 7.5)) == "MethotrexateDoseGiven"  # +2.5
    events = given(history, mtx(1, date(2026, 12, 3), 10.0, "investigator escalated faster"))
    assert isinstance(events[-1], ProtocolDeviationRecorded)
    assert events[-1].deviations == ("dose_step_exceeded",)
    assert refused([created("mtx")], mtx(0, date(2026, 11, 26), 10.0)).code == \
        "dose_step_exceeded"  # above week 0's 7.5 mg


def test_a_weight_far_from_the_last_one_must_be_confirmed() -> None:
    """Defect 8: a 70 kg patient recorded at 100 kg got 3 x 10^8 cells without a flag."""
    history: list[EventData] = [created("msc_low")]  # 70 kg at baseline
    problem = refused(history, infusion(0, date(2026, 11, 26), 100_000_000, weight_kg=100.0))
    assert (problem.status, problem.code, problem.extra["last_weight_kg"]) == (
        422, "weight_change_unconfirmed", 70.0)
    confirmed = given(history, infusion(0, date(2026, 11, 26), 100_000_000, weight_kg=100.0,
                                        weight_confirmed=True))[0]
    assert isinstance(confirmed, InfusionGiven) and confirmed.weight_change_confirmed
    near = given(history, infusion(0, date(2026, 11, 26), 75_000_000, weight_kg=75.0))[0]
    assert isinstance(near, InfusionGiven) and not near.weight_change_confirmed  # within 10 %


def test_a_deviation_reason_without_a_deviation_records_no_deviation() -> None:
    """Defect 9: a reason on an on-time, on-target dose wrote an empty ProtocolDeviationRecorded."""
    events = given([created("msc_low")], infusion(0, date(2026, 11, 26), deviation="just in case"))
    assert [e.event_type() for e in events] == ["InfusionGiven", "DosingScheduleReanchored"]
