"""Given a patient's follow-up events, when efficacy learns a fact, records or corrects an
assessment, discontinues treatment or sweeps, then these events or this refusal
(services/efficacy/domain.py, the `followups(protocol)` decider)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given as given_examples
from hypothesis import settings
from hypothesis import strategies as st

from services.dosing import calendar
from services.dosing import domain as dosing
from services.dosing import holds as holding
from services.efficacy import domain
from shared.errors import Refused
from shared.events import (
    AdverseEventFollowedUp,
    AdverseEventReported,
    ArmAssigned,
    ArmCrossedOver,
    AssessmentCorrected,
    AssessmentRecorded,
    DeathRecorded,
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
from shared.protocol import default_protocol
from shared.web import Problem, refusal_problem

PROTOCOL = default_protocol()
FOLLOWUPS = domain.followups(PROTOCOL)
SHANGHAI = ZoneInfo("Asia/Shanghai")  # both sites' zone, UTC+8 all year
DAY_0 = date(2026, 11, 26)
RANDOMIZED = datetime(2026, 11, 26, 1, 30, tzinfo=UTC)  # 09:30 on 26 November at the sites
NOW = datetime(2028, 1, 1, tzinfo=UTC)  # after the whole calendar: nothing is in the future


def site_time(day: date, hour: int = 10, minute: int = 0) -> datetime:
    """An instant on the sites' wall clock."""
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=SHANGHAI)


def assessment_visits(anchor: date = DAY_0) -> tuple[PlannedVisit, ...]:
    """The dated assessment visits, as dosing plans them."""
    return tuple(v for v in calendar.plan("msc_low", PROTOCOL, anchor, anchor, 70.0)
                 if v.kind == "assessment")


VISITS = assessment_visits()
VISIT = {v.week: v for v in VISITS}  # week 4: due 24 December, window 22 to 26 December


def fact(kind: str, **fields: Any) -> FollowUpFactRecorded:
    return FollowUpFactRecorded.model_validate({
        "patient_id": "P1", "site_id": "S1", "fact": kind, "at": RANDOMIZED,
        "source_event_id": f"src-{kind}", **fields})


ENROLLED = fact("enrolled", screening_pasi=22.4, screening_bsa_percent=18.0, screening_dlqi=12)
FOLLOWED: list[EventData] = [ENROLLED, fact("randomized", arm="msc_low"),
                             fact("assessment_visits", visits=VISITS)]


def measured(pasi: str = "12.5", bsa: float | None = 10.0, dlqi: int | None = 5,
             spga: int | None = 2) -> domain.Measurements:
    return domain.Measurements(pasi_total=Decimal(pasi), bsa_percent=bsa, dlqi_total=dlqi,
                               spga=spga)


def assess(week: int | None, at_: datetime, assessment_id: str | None = None,
           pasi: str = "12.5", now: datetime = NOW) -> domain.RecordAssessment:
    return domain.RecordAssessment(assessment_id or f"a-{week}", week, at_, measured(pasi), now)


def on_due_day(week: int, pasi: str = "12.5") -> domain.RecordAssessment:
    return assess(week, site_time(VISIT[week].due_date), pasi=pasi)


def decide(history: list[EventData], command: domain.FollowUpCommand) -> list[EventData]:
    return FOLLOWUPS.decide(FOLLOWUPS.fold(history), command)


def then(history: list[EventData], command: domain.FollowUpCommand) -> list[EventData]:
    return history + decide(history, command)


def refused(history: list[EventData], command: domain.FollowUpCommand) -> Problem:
    """The refusal as the caller gets it (status from the web layer's one table)."""
    with pytest.raises(Refused) as caught:
        decide(history, command)
    return refusal_problem(caught.value)


def sweep(history: list[EventData], now: datetime) -> list[EventData]:
    return decide(history, domain.Sweep(now))


def types(events: list[EventData]) -> list[str]:
    return [e.event_type() for e in events]


def correct(assessment_id: str, **changes: Any) -> domain.CorrectAssessment:
    return domain.CorrectAssessment("c-1", assessment_id, changes, "transcription error", NOW)


# Real events of the other topics, for what efficacy learns.
ENROLMENT = PatientEnrolled(patient_id="P1", site_id="S1", screening_id="SCR-1",
                            baseline_weight_kg=70.0, baseline_pasi=22.4,
                            enrolled_at=RANDOMIZED - timedelta(hours=1),
                            baseline_bsa_percent=18.0, baseline_dlqi=12)
ASSIGNED = ArmAssigned(patient_id="P1", site_id="S1", arm="msc_low", randomization_number=1,
                       stratum="S1:pasi_ge20", baseline_weight_kg=70.0, assigned_at=RANDOMIZED)
SCHEDULE = dosing.calendar_for(ASSIGNED, PROTOCOL)


def learnt(events: list[EventData], history: list[EventData] | None = None) -> list[EventData]:
    """The history after efficacy learnt each event in turn (event ids: `<type>-<n>`)."""
    found = list(history or [])
    for n, event in enumerate(events):
        found += decide(found, domain.Learn(event, f"{event.event_type()}-{n}", RANDOMIZED))
    return found


def adverse_event(grade: int, outcome: str | None = None, ae_id: str = "AE1",
                  reported_at: datetime | None = RANDOMIZED + timedelta(days=30)
                  ) -> AdverseEventReported:
    return AdverseEventReported.model_validate({
        "adverse_event_id": ae_id, "patient_id": "P1", "site_id": "S1", "term": "sepsis",
        "onset_at": RANDOMIZED + timedelta(days=29), "ctcae_grade": grade, "serious": grade >= 3,
        "relatedness": "unlikely", "expected": False, "reported_at": reported_at,
        "outcome": outcome})


def follow_up(grade: int | None = None, outcome: str | None = None) -> AdverseEventFollowedUp:
    return AdverseEventFollowedUp.model_validate({
        "follow_up_id": "FU1", "adverse_event_id": "AE1", "patient_id": "P1", "site_id": "S1",
        "ctcae_grade": grade, "outcome": outcome,
        "reported_at": RANDOMIZED + timedelta(days=40)})


# --- learning ---------------------------------------------------------------------------------


def test_each_enrolment_fact_is_learnt_once() -> None:
    second_assignment = ArmAssigned(**{**ASSIGNED.model_dump(), "arm": "mtx",
                                       "randomization_number": 2})
    history = learnt([ENROLMENT, ASSIGNED, SCHEDULE, ENROLMENT, second_assignment])
    facts = [e for e in history if isinstance(e, FollowUpFactRecorded)]
    assert len(facts) == len(history) == 3
    assert [f.fact for f in facts] == ["enrolled", "randomized", "assessment_visits"]
    assert [f.source_event_id for f in facts] == [
        "PatientEnrolled-0", "ArmAssigned-1", "DosingScheduleCreated-2"]
    assert facts[0].at == ENROLMENT.enrolled_at and facts[1].at == ASSIGNED.assigned_at
    state = FOLLOWUPS.fold(history)
    assert (state.screening_pasi, state.screening_bsa_percent, state.screening_dlqi) == (
        22.4, 18.0, 12)
    assert state.randomized_arm == state.arm == "msc_low"  # the second assignment changed nothing
    assert state.randomized_at == RANDOMIZED
    assert tuple(v.visit for v in state.visits) == tuple(
        v for v in SCHEDULE.visits if v.kind == "assessment")
    assert [v.visit.week for v in state.visits] == list(PROTOCOL.assessment_weeks)
    assert {v.status for v in state.visits} == {"planned"}
    # Built from the facts directly, the follow-up is the same.
    assert state.visits == FOLLOWUPS.fold(FOLLOWED).visits
    # The same calendar read again (dosing re-published it) leaves the follow-up as it was.
    assert FOLLOWUPS.fold(learnt([SCHEDULE], history)) == state


def test_the_enrolment_is_learnt_even_when_the_calendar_was_read_first() -> None:
    history = learnt([SCHEDULE, ENROLMENT, ASSIGNED])
    assert "enrolled" in [e.fact for e in history if isinstance(e, FollowUpFactRecorded)]
    assert FOLLOWUPS.fold(history).screening_pasi == 22.4


def test_a_crossover_changes_the_arm_not_the_analysis_arm_nor_the_assessment_visits() -> None:
    history = learnt([ENROLMENT, ASSIGNED, SCHEDULE])
    crossed = ArmCrossedOver(patient_id="P1", site_id="S1", from_arm="msc_low", to_arm="mtx",
                             reason="no response", crossed_over_at=RANDOMIZED + timedelta(weeks=17))
    new_calendar = dosing.decide_crossover(dosing.fold([SCHEDULE]), crossed, PROTOCOL)[1]
    assert isinstance(new_calendar, DosingScheduleCreated)
    assert {v.kind for v in new_calendar.visits} == {"methotrexate"}  # doses only
    history = learnt([crossed], history)
    assert [e.fact for e in history[3:] if isinstance(e, FollowUpFactRecorded)] == [
        "crossed_over"]
    before = FOLLOWUPS.fold(history)
    assert (before.randomized_arm, before.arm) == ("msc_low", "mtx")
    assert learnt([new_calendar, crossed], history) == history  # nothing more
    assert FOLLOWUPS.fold(history).visits == before.visits


def test_a_re_dated_calendar_re_dates_the_visits_and_keeps_those_done() -> None:
    history = then(learnt([ENROLMENT, ASSIGNED, SCHEDULE]), on_due_day(0))
    # The week-0 infusion on 27 November fixes day 0 there: dosing re-dates its calendar.
    dose = dosing.decide_dose(dosing.fold([SCHEDULE]), holding.Holds(), dosing.RecordInfusion(
        "inf-0", 0, site_time(date(2026, 11, 27)), 70.0, 70_000_000, "L-1", None, NOW), PROTOCOL)
    reanchored = dose[-1]
    assert isinstance(reanchored, DosingScheduleReanchored)
    history = learnt([reanchored], history)
    assert isinstance(history[-1], FollowUpFactRecorded)
    assert history[-1].fact == "assessment_visits"
    state = FOLLOWUPS.fold(history)
    week_0, week_4 = state.visit(0), state.visit(4)
    assert week_0 is not None and week_4 is not None
    assert (week_0.status, week_0.assessment_id) == ("done", "a-0")
    assert (week_4.status, week_4.visit.due_date) == ("planned", date(2026, 12, 25))


def test_a_withdrawal_is_learnt_once_and_ends_the_follow_up() -> None:
    history = then(learnt([ENROLMENT, ASSIGNED, SCHEDULE]), on_due_day(0))
    withdrawn = PatientWithdrawn(patient_id="P1", site_id="S1", reason="moved away",
                                 withdrawn_at=RANDOMIZED + timedelta(days=10))
    history = learnt([withdrawn, withdrawn, SCHEDULE], history)
    facts = [e for e in history if isinstance(e, FollowUpFactRecorded)]
    assert [f.fact for f in facts][-1] == "withdrawn" and len(facts) == 4
    assert facts[-1].reason == "moved away" and facts[-1].at == withdrawn.withdrawn_at
    state = FOLLOWUPS.fold(history)
    assert (state.ended, state.ended_at) == ("withdrawn", withdrawn.withdrawn_at)
    assert [v.status for v in state.visits] == ["done"] + ["cancelled"] * 7


@pytest.mark.parametrize("event", [
    adverse_event(5, "fatal"), adverse_event(5), adverse_event(4, "fatal"),
    follow_up(outcome="fatal"), follow_up(grade=5)],
    ids=["grade_5_fatal", "grade_5", "outcome_fatal", "follow_up_fatal", "follow_up_grade_5"])
def test_a_fatal_adverse_event_records_the_death_once(event: EventData) -> None:
    history = learnt([ENROLMENT, ASSIGNED, SCHEDULE])
    if isinstance(event, AdverseEventFollowedUp):
        history = learnt([adverse_event(3)], history)
        assert len(history) == 3  # the grade-3 report itself was no death
    found = decide(history, domain.Learn(event, "safety-1", RANDOMIZED + timedelta(days=50)))
    assert types(found) == ["DeathRecorded"]
    death = found[0]
    assert isinstance(death, DeathRecorded)
    assert (death.adverse_event_id, death.source_event_id) == ("AE1", "safety-1")
    assert death.reported_at == event.reported_at  # type: ignore[attr-defined]
    history += found
    state = FOLLOWUPS.fold(history)
    assert state.ended == "died" and {v.status for v in state.visits} == {"cancelled"}
    assert learnt([event, adverse_event(5, "fatal", ae_id="AE2")], history) == history


def test_a_death_without_a_report_time_is_dated_by_the_event() -> None:
    history = learnt([ENROLMENT, ASSIGNED, SCHEDULE])
    learn_at = RANDOMIZED + timedelta(days=31)
    found = decide(history, domain.Learn(adverse_event(5, reported_at=None), "s-9", learn_at))
    assert isinstance(found[0], DeathRecorded) and found[0].reported_at == learn_at


@pytest.mark.parametrize("event", [adverse_event(4), adverse_event(1, "recovered"),
                                   follow_up(grade=4), follow_up(outcome="not_recovered")],
                         ids=["grade_4", "grade_1", "follow_up_grade_4", "follow_up_not_fatal"])
def test_an_adverse_event_short_of_death_adds_nothing(event: EventData) -> None:
    history = learnt([ENROLMENT, ASSIGNED, SCHEDULE])
    assert decide(history, domain.Learn(event, "safety-1", RANDOMIZED)) == []


# --- recording an assessment ------------------------------------------------------------------


def test_an_assessment_in_its_window_is_recorded_on_the_site_date() -> None:
    found = decide(FOLLOWED, assess(4, site_time(date(2026, 12, 24), 7)))
    assert types(found) == ["AssessmentRecorded"]
    recorded = found[0]
    assert isinstance(recorded, AssessmentRecorded)
    assert (recorded.assessment_id, recorded.patient_id, recorded.site_id, recorded.arm) == (
        "a-4", "P1", "S1", "msc_low")
    assert (recorded.week, recorded.unscheduled) == (4, False)
    # 07:00 on 24 December at the site is 23:00 on the 23rd in UTC: stored in UTC, dated locally.
    assert recorded.assessed_at == datetime(2026, 12, 23, 23, tzinfo=UTC)
    assert recorded.assessed_at.utcoffset() == timedelta(0)
    assert recorded.assessed_on == date(2026, 12, 24)
    assert (recorded.late_entry, recorded.after_treatment_discontinued) == (False, False)
    assert (recorded.pasi_total, recorded.bsa_percent, recorded.dlqi_total, recorded.spga) == (
        12.5, 10.0, 5, 2)
    visit = FOLLOWUPS.fold(FOLLOWED + found).visit(4)
    assert visit is not None and (visit.status, visit.assessment_id) == ("done", "a-4")


WEEK_4_EDGES = [  # week 4's window is 22 to 26 December at the site (UTC+8)
    (datetime(2026, 12, 21, 15, 59, tzinfo=UTC), None),  # 21 Dec 23:59 at the site
    (datetime(2026, 12, 21, 16, 0, tzinfo=UTC), date(2026, 12, 22)),  # UTC 21st, site 22nd
    (datetime(2026, 12, 26, 15, 59, tzinfo=UTC), date(2026, 12, 26)),  # 26 Dec 23:59 at the site
    (datetime(2026, 12, 26, 16, 0, tzinfo=UTC), None),  # UTC still the 26th, site the 27th
]


@pytest.mark.parametrize(("instant", "assessed_on"), WEEK_4_EDGES,
                         ids=["site_day_before", "site_first_day_utc_day_before",
                              "site_last_day", "site_day_after_utc_last_day"])
def test_the_window_is_judged_on_the_site_date(instant: datetime,
                                               assessed_on: date | None) -> None:
    for written in (instant, instant.astimezone(SHANGHAI)):  # the offset it is written in: no matter
        if assessed_on is None:
            problem = refused(FOLLOWED, assess(4, written))
            assert (problem.status, problem.code) == (422, "out_of_window")
            assert (problem.extra["window_start"], problem.extra["window_end"]) == (
                "2026-12-22", "2026-12-26")
        else:
            recorded = decide(FOLLOWED, assess(4, written))[0]
            assert isinstance(recorded, AssessmentRecorded)
            assert recorded.assessed_on == assessed_on and recorded.assessed_at == instant
            assert recorded.assessed_at.utcoffset() == timedelta(0)


def test_a_week_that_is_not_an_assessment_week_is_refused() -> None:
    problem = refused(FOLLOWED, assess(5, site_time(date(2026, 12, 31))))
    assert (problem.status, problem.code) == (422, "not_an_assessment_week")
    assert problem.extra["assessment_weeks"] == [0, 4, 8, 12, 16, 24, 36, 52]


def test_an_unscheduled_assessment_has_no_week_and_marks_no_visit() -> None:
    found = decide(FOLLOWED, assess(None, site_time(date(2026, 12, 10)), "u-1"))
    recorded = found[0]
    assert isinstance(recorded, AssessmentRecorded) and len(found) == 1
    assert (recorded.week, recorded.unscheduled, recorded.assessed_on) == (
        None, True, date(2026, 12, 10))
    state = FOLLOWUPS.fold(FOLLOWED + found)
    assert {v.status for v in state.visits} == {"planned"}
    assert [a.assessment_id for a in state.assessments] == ["u-1"]


def test_a_week_is_assessed_once() -> None:
    history = then(FOLLOWED, on_due_day(4))
    problem = refused(history, assess(4, site_time(date(2026, 12, 25)), "a-4-again"))
    assert (problem.status, problem.code) == (409, "already_assessed")
    assert problem.extra["assessment_id"] == "a-4"


def test_an_assessment_ahead_of_the_clock_by_more_than_five_minutes_is_refused() -> None:
    now = site_time(date(2026, 12, 24), 10)
    ok = decide(FOLLOWED, assess(4, now + timedelta(minutes=5), now=now))
    assert types(ok) == ["AssessmentRecorded"]
    problem = refused(FOLLOWED, assess(4, now + timedelta(minutes=5, seconds=1), now=now))
    assert (problem.status, problem.code) == (422, "assessed_in_future")


def test_no_assessment_after_a_withdrawal() -> None:
    problem = refused([*FOLLOWED, fact("withdrawn", reason="moved away")], on_due_day(4))
    assert (problem.status, problem.code) == (409, "withdrawn")


ENDINGS: list[EventData] = [
    DeathRecorded(patient_id="P1", site_id="S1", adverse_event_id="AE1",
                  reported_at=RANDOMIZED + timedelta(days=5), source_event_id="s-1"),
    StudyCompleted(patient_id="P1", site_id="S1", assessment_id="a-52",
                   completed_at=RANDOMIZED + timedelta(days=5)),
    LostToFollowUp(patient_id="P1", site_id="S1", declared_by="dr-who", reason="no contact",
                   at=RANDOMIZED + timedelta(days=5)),
]


@pytest.mark.parametrize("ending", ENDINGS, ids=["died", "completed", "lost_to_follow_up"])
def test_no_assessment_once_the_study_ended(ending: EventData) -> None:
    history = [*FOLLOWED, ending]
    disposition = FOLLOWUPS.fold(history).ended
    assert disposition in ("died", "completed", "lost_to_follow_up")
    for command in (on_due_day(4), assess(None, site_time(date(2026, 12, 10)))):
        problem = refused(history, command)
        assert (problem.status, problem.code, problem.extra["disposition"]) == (
            409, "study_ended", disposition)
    assert sweep(history, NOW) == []  # and nothing missed after it


def test_an_unknown_patient_is_not_found() -> None:
    histories: list[list[EventData]] = [[], [ENROLLED]]  # not randomized: no one's follow-up
    for history in histories:
        problem = refused(history, on_due_day(4))
        assert (problem.status, problem.code) == (404, "patient_not_found")
        assert sweep(history, NOW) == []


def test_a_scheduled_assessment_waits_for_the_visits_to_be_known() -> None:
    history = FOLLOWED[:2]  # enrolled and randomized; dosing's calendar not read yet
    problem = refused(history, on_due_day(4))
    assert (problem.status, problem.code) == (409, "assessment_visits_unknown")
    assert types(decide(history, assess(None, site_time(date(2026, 12, 10))))) == [
        "AssessmentRecorded"]  # an unscheduled one needs no visit


def test_a_visit_swept_as_missed_is_still_accepted_within_its_window_as_a_late_entry() -> None:
    history = then(FOLLOWED, on_due_day(0))
    history += sweep(history, site_time(date(2026, 12, 27), 8))
    assert [(e.week, e.kind) for e in history if isinstance(e, VisitMissed)] == [
        (4, "assessment")]
    recorded = decide(history, assess(4, site_time(date(2026, 12, 26), 18)))[0]
    assert isinstance(recorded, AssessmentRecorded) and recorded.late_entry
    state = FOLLOWUPS.fold([*history, recorded])
    visit = state.visit(4)
    assert visit is not None and (visit.status, visit.assessment_id) == ("done", "a-4")
    # Outside the window it stays refused, missed or not.
    assert refused(history, assess(4, site_time(date(2026, 12, 27)))).code == "out_of_window"


def test_an_assessment_after_the_treatment_was_discontinued_is_flagged() -> None:
    stopped_at = site_time(date(2026, 12, 24), 12)
    history = then(FOLLOWED, domain.DiscontinueTreatment("hepatotoxicity", "dr-who", stopped_at))
    before = decide(history, assess(4, stopped_at - timedelta(hours=3)))[0]
    at_noon = decide(history, assess(4, stopped_at))[0]
    later = decide(history, assess(4, site_time(date(2026, 12, 25))))[0]
    assert isinstance(before, AssessmentRecorded) and not before.after_treatment_discontinued
    assert isinstance(at_noon, AssessmentRecorded) and at_noon.after_treatment_discontinued
    assert isinstance(later, AssessmentRecorded) and later.after_treatment_discontinued


def test_the_week_52_assessment_completes_the_study() -> None:
    done = FOLLOWED
    for week in (0, 4, 8, 12, 16, 24, 36):
        done = then(done, on_due_day(week))
    found = decide(done, on_due_day(52))
    assert types(found) == ["AssessmentRecorded", "StudyCompleted"]
    recorded, completed = found
    assert isinstance(recorded, AssessmentRecorded) and isinstance(completed, StudyCompleted)
    assert (completed.assessment_id, completed.completed_at) == ("a-52", recorded.assessed_at)
    state = FOLLOWUPS.fold(done + found)
    assert (state.ended, state.ended_at) == ("completed", recorded.assessed_at)
    assert [v.status for v in state.visits] == ["done"] * 8
    assert types(decide(FOLLOWED, on_due_day(36))) == ["AssessmentRecorded"]  # not before 52


def test_a_visit_closed_before_completion_is_missed_whether_or_not_the_sweep_ran_first() -> None:
    """D49: the same history gives the same ledger, however the sweep's timing fell."""
    done = FOLLOWED
    for week in (0, 4, 8, 12, 16, 24):  # week 36 is never assessed
        done = then(done, on_due_day(week))
    completion = on_due_day(52)
    at_once = decide(done, completion)  # the sweep had not run since week 36's window closed
    assert types(at_once) == ["VisitMissed", "AssessmentRecorded", "StudyCompleted"]
    assert isinstance(at_once[0], VisitMissed) and at_once[0].week == 36
    swept = then(done, domain.Sweep(site_time(VISIT[52].due_date)))
    assert types(swept[len(done):]) == ["VisitMissed"]  # the sweep first, then the visit
    after_sweep = decide(swept, completion)
    assert types(after_sweep) == ["AssessmentRecorded", "StudyCompleted"]
    for history in (done + at_once, swept + after_sweep):
        state = FOLLOWUPS.fold(history)
        assert [v.status for v in state.visits] == ["done"] * 6 + ["missed", "done"]
        assert state.ended == "completed"


# --- baseline ---------------------------------------------------------------------------------


def test_the_baseline_is_the_week_0_pasi_else_the_screening_pasi() -> None:
    state = FOLLOWUPS.fold(FOLLOWED)
    assert state.baseline_pasi == Decimal("22.4")
    assert state.baseline == {"source": "screening", "pasi": 22.4, "bsa_percent": 18.0,
                              "dlqi": 12}
    history = then(FOLLOWED, assess(None, site_time(date(2026, 11, 26)), "u-0", pasi="30"))
    history = then(history, on_due_day(4, pasi="15.3"))
    assert FOLLOWUPS.fold(history).baseline_pasi == Decimal("22.4")  # neither is week 0
    history = then(history, on_due_day(0, pasi="23.8"))
    state = FOLLOWUPS.fold(history)
    assert state.baseline_pasi == Decimal("23.8")
    assert state.baseline == {"source": "week_0", "pasi": 23.8, "bsa_percent": 10.0, "dlqi": 5}
    assert FOLLOWUPS.fold(FOLLOWED[1:]).baseline_pasi is None  # no screening PASI, no week 0


# --- corrections ------------------------------------------------------------------------------


def test_a_correction_names_exactly_the_fields_it_changes_and_keeps_the_record() -> None:
    history = then(FOLLOWED, on_due_day(4))
    recorded = history[-1]
    found = decide(history, correct("a-4", pasi_total=11.0, bsa_percent=10.0, spga=1))
    assert types(found) == ["AssessmentCorrected"]
    corrected = found[0]
    assert isinstance(corrected, AssessmentCorrected)
    assert corrected.changed == ("pasi_total", "spga")  # bsa_percent was 10.0 already
    assert (corrected.assessment_id, corrected.correction_id, corrected.week) == (
        "a-4", "c-1", 4)
    assert (corrected.reason, corrected.corrected_at) == ("transcription error", NOW)
    # The correction carries the measurements as they now stand, the unchanged ones too.
    assert (corrected.pasi_total, corrected.bsa_percent, corrected.dlqi_total, corrected.spga) == (
        11.0, 10.0, 5, 1)
    history += found
    assert history[-2] is recorded and isinstance(recorded, AssessmentRecorded)
    assert (recorded.pasi_total, recorded.spga) == (12.5, 2)  # the record is never rewritten
    now_measured = FOLLOWUPS.fold(history).assessment("a-4")
    assert now_measured is not None and now_measured.corrections == 1
    assert (now_measured.measured.pasi_total, now_measured.measured.spga) == (Decimal("11"), 1)
    # A second correction is judged against the corrected values.
    assert refused(history, correct("a-4", pasi_total=11.0)).code == "nothing_to_correct"
    back = decide(history, correct("a-4", pasi_total=12.5, dlqi_total=None))[0]
    assert isinstance(back, AssessmentCorrected)
    assert back.changed == ("pasi_total", "dlqi_total")


def test_a_correction_of_the_pasi_regions() -> None:
    regions = {"head": {"erythema": 2, "induration": 1, "desquamation": 1, "area": 2},
               "upper_limbs": {"erythema": 3, "induration": 2, "desquamation": 2, "area": 3},
               "trunk": {"erythema": 2, "induration": 2, "desquamation": 1, "area": 4},
               "lower_limbs": {"erythema": 3, "induration": 3, "desquamation": 2, "area": 4}}
    history = then(FOLLOWED, on_due_day(4))
    corrected = decide(history, correct("a-4", pasi_regions=regions, pasi_total=23.8))[0]
    assert isinstance(corrected, AssessmentCorrected)
    assert corrected.changed == ("pasi_regions", "pasi_total")
    history.append(corrected)
    assert refused(history, correct("a-4", pasi_regions=regions)).code == "nothing_to_correct"


def test_a_correction_that_changes_nothing_is_refused() -> None:
    history = then(FOLLOWED, on_due_day(4))
    problem = refused(history, correct("a-4", pasi_total=12.5, bsa_percent=10.0, dlqi_total=5))
    assert (problem.status, problem.code) == (422, "nothing_to_correct")


def test_a_correction_of_an_unknown_assessment_is_refused() -> None:
    history = then(FOLLOWED, on_due_day(4))
    problem = refused(history, correct("a-404", pasi_total=1.0))
    assert (problem.status, problem.code) == (404, "assessment_not_found")


def test_a_correction_of_the_week_0_assessment_moves_the_baseline() -> None:
    history = then(FOLLOWED, on_due_day(0, pasi="20"))
    history = then(history, correct("a-0", pasi_total=24.0))
    assert FOLLOWUPS.fold(history).baseline_pasi == Decimal("24.0")


# --- treatment discontinuation ----------------------------------------------------------------


def test_the_treatment_is_discontinued_once() -> None:
    stop = domain.DiscontinueTreatment("liver enzymes", "dr-who", site_time(date(2026, 12, 1)))
    found = decide(FOLLOWED, stop)
    assert types(found) == ["TreatmentDiscontinued"]
    event = found[0]
    assert isinstance(event, TreatmentDiscontinued)
    assert (event.patient_id, event.site_id, event.reason, event.decided_by) == (
        "P1", "S1", "liver enzymes", "dr-who")
    assert event.discontinued_at == stop.now
    history = FOLLOWED + found
    state = FOLLOWUPS.fold(history)
    assert state.ended is None and {v.status for v in state.visits} == {"planned"}
    problem = refused(history, stop)
    assert (problem.status, problem.code) == (409, "already_discontinued")
    assert types(decide(history, on_due_day(4))) == ["AssessmentRecorded"]  # assessments go on
    assert refused([*FOLLOWED, fact("withdrawn")], stop).code == "withdrawn"
    assert refused([], stop).code == "patient_not_found"


# --- the sweep --------------------------------------------------------------------------------


def test_the_visit_is_missed_from_the_site_day_after_its_window_closes() -> None:
    # Week 0's window ends 28 November: 15:59 UTC is 23:59 that day at the sites, and 16:00 UTC,
    # still the 28th in UTC, is already the 29th there.
    assert sweep(FOLLOWED, datetime(2026, 11, 28, 15, 59, tzinfo=UTC)) == []
    detected = datetime(2026, 11, 28, 16, 0, tzinfo=UTC)
    found = sweep(FOLLOWED, detected)
    assert types(found) == ["VisitMissed"]
    missed = found[0]
    assert isinstance(missed, VisitMissed)
    assert (missed.patient_id, missed.site_id, missed.arm, missed.week, missed.kind) == (
        "P1", "S1", "msc_low", 0, "assessment")
    assert (missed.due_date, missed.window_end, missed.detected_at) == (
        date(2026, 11, 26), date(2026, 11, 28), detected)
    assert missed.topic_of() == "trial.efficacy"
    history = FOLLOWED + found
    visit = FOLLOWUPS.fold(history).visit(0)
    assert visit is not None and visit.status == "missed"
    assert sweep(history, detected + timedelta(hours=20)) == []  # once


def test_two_assessments_missed_in_a_row_lose_the_patient() -> None:
    history = then(FOLLOWED, on_due_day(0))
    found = sweep(history, site_time(date(2027, 1, 24)))  # weeks 4 and 8 closed unassessed
    assert types(found) == ["VisitMissed", "VisitMissed", "LostToFollowUp"]
    lost = found[-1]
    assert isinstance(lost, LostToFollowUp)
    assert (lost.missed_weeks, lost.declared_by, lost.at) == (
        (4, 8), "efficacy-sweep", site_time(date(2027, 1, 24)))
    history += found
    state = FOLLOWUPS.fold(history)
    assert state.ended == "lost_to_follow_up"
    assert [v.status for v in state.visits] == ["done", "missed", "missed"] + ["cancelled"] * 5
    assert sweep(history, NOW) == []


PROVISIONAL: list[EventData] = learnt([ENROLMENT, ASSIGNED, SCHEDULE])


def test_a_first_dose_held_for_weeks_loses_no_one_and_its_calendar_is_the_one_swept() -> None:
    """D95. Until the first dose, the assessments are dated provisionally from randomization:
    they may be missed there, but no run of them loses the patient, since the first dose
    (delayed by a safety hold, say) re-dates them all and a missed one may then lie ahead.
    Once day 0 is fixed, the run counts."""
    assert FOLLOWUPS.fold(PROVISIONAL).day_zero_fixed is False
    history = then(PROVISIONAL, on_due_day(0))
    found = sweep(history, site_time(date(2027, 1, 24)))  # weeks 4 and 8 closed, undosed
    assert types(found) == ["VisitMissed", "VisitMissed"]
    history += found
    assert FOLLOWUPS.fold(history).ended is None
    first_dose = date(2027, 1, 28)  # nine weeks late: the calendar from here
    reanchored = DosingScheduleReanchored(
        patient_id="P1", site_id="S1", arm="msc_low", anchor_date=first_dose,
        visits=calendar.reanchor(SCHEDULE.visits, first_dose, RANDOMIZED.date(),
                                 PROTOCOL.window_days))
    history = learnt([reanchored], history)
    state = FOLLOWUPS.fold(history)
    assert state.day_zero_fixed is True and state.ended is None
    assert [v.status for v in state.visits][:3] == ["done", "planned", "planned"]
    week4 = state.visit(4)
    assert week4 is not None and week4.visit.due_date == first_dose + timedelta(weeks=4)
    found = sweep(history, site_time(first_dose + timedelta(weeks=8, days=3)))
    assert types(found) == ["VisitMissed", "VisitMissed", "LostToFollowUp"]
    lost = found[-1]
    assert isinstance(lost, LostToFollowUp) and lost.missed_weeks == (4, 8)


def test_a_treatment_stopped_before_the_first_dose_leaves_the_provisional_calendar_standing(
        ) -> None:
    history = then(PROVISIONAL, on_due_day(0))
    history = then(history, domain.DiscontinueTreatment("no dose will be given", "dr-who",
                                                        RANDOMIZED + timedelta(days=3)))
    found = sweep(history, site_time(date(2027, 1, 24)))
    assert types(found) == ["VisitMissed", "VisitMissed", "LostToFollowUp"]


def test_one_missed_assessment_is_not_a_loss() -> None:
    history = then(FOLLOWED, on_due_day(0))
    found = sweep(history, site_time(date(2026, 12, 27)))
    assert types(found) == ["VisitMissed"]
    assert FOLLOWUPS.fold(history + found).ended is None


@pytest.mark.parametrize("contact", [
    assess(None, site_time(date(2027, 1, 5)), "u-1"), on_due_day(8)],
    ids=["unscheduled", "scheduled"])
def test_an_assessment_between_two_missed_visits_breaks_the_run(
        contact: domain.RecordAssessment) -> None:
    history = then(FOLLOWED, on_due_day(0))
    history += sweep(history, site_time(date(2026, 12, 27)))  # week 4 missed
    history = then(history, contact)
    if contact.week is None:
        found = sweep(history, site_time(date(2027, 1, 24)))  # week 8 missed: one since contact
        assert types(found) == ["VisitMissed"]
        history += found
        found = sweep(history, site_time(date(2027, 2, 21)))  # week 12: two since contact
        last_two = (8, 12)
    else:
        found = sweep(history, site_time(date(2027, 2, 21)))  # week 12: one since contact
        assert types(found) == ["VisitMissed"]
        history += found
        found = sweep(history, site_time(date(2027, 3, 21)))  # week 16: two since contact
        last_two = (12, 16)
    assert types(found) == ["VisitMissed", "LostToFollowUp"]
    assert isinstance(found[-1], LostToFollowUp) and found[-1].missed_weeks == last_two


def test_the_investigator_may_declare_the_patient_lost_with_the_run_so_far() -> None:
    history = then(FOLLOWED, on_due_day(0))
    history += sweep(history, site_time(date(2026, 12, 27)))
    found = decide(history, domain.DeclareLost("no answer", "dr-who", NOW))
    lost = found[0]
    assert isinstance(lost, LostToFollowUp)
    assert (lost.missed_weeks, lost.declared_by, lost.reason) == ((4,), "dr-who", "no answer")
    assert refused(history + found, domain.DeclareLost("again", "dr-who", NOW)).code == (
        "study_ended")


@pytest.mark.parametrize("ending", [fact("withdrawn"), *ENDINGS],
                         ids=["withdrawn", "died", "completed", "lost_to_follow_up"])
def test_nothing_is_missed_after_the_study_ended(ending: EventData) -> None:
    assert sweep([*FOLLOWED, ending], NOW) == []


def test_nothing_is_missed_before_the_visits_are_known() -> None:
    assert sweep(FOLLOWED[:2], NOW) == []


@settings(max_examples=100, deadline=None)
@given_examples(assessed=st.sets(st.sampled_from(PROTOCOL.assessment_weeks[:-1])),
                sweep_days=st.lists(st.integers(0, 400), min_size=1, max_size=8))
def test_sweeps_at_any_days_miss_each_visit_once_and_lose_the_patient_once(
        assessed: set[int], sweep_days: list[int]) -> None:
    """Assessments on their due days and sweeps on the given days, in the order they happen."""
    timeline = sorted([(site_time(VISIT[week].due_date), week) for week in assessed]
                      + [(RANDOMIZED + timedelta(days=day), None) for day in sweep_days],
                      key=lambda step: step[0])
    history: list[EventData] = list(FOLLOWED)
    for instant, week in timeline:
        if week is None:
            history += sweep(history, instant)
        elif FOLLOWUPS.fold(history).ended is None:
            history = then(history, on_due_day(week))
    done = {e.week for e in history if isinstance(e, AssessmentRecorded) and e.week is not None}
    missed = [e.week for e in history if isinstance(e, VisitMissed)]
    lost = [e for e in history if isinstance(e, LostToFollowUp)]
    assert len(missed) == len(set(missed)) and not set(missed) & done
    assert len(lost) <= 1
    # The run: the visits missed since the patient was last seen (lost from 2 on).
    last_seen = max((VISIT[week].due_date for week in done), default=date.min)
    run = tuple(week for week in sorted(missed) if VISIT[week].due_date > last_seen)
    if lost:
        assert lost[0].missed_weeks == run
        assert len(run) >= PROTOCOL.efficacy.lost_to_follow_up_after_missed
        assert history[-1] is lost[0]  # nothing after it
    else:
        assert len(run) < PROTOCOL.efficacy.lost_to_follow_up_after_missed
