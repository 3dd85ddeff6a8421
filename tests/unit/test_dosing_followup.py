"""Given a patient's dosing events, when dosing reads an event of trial.efficacy (an assessment,
a missed assessment, a disposition), then these events; and the doses it refuses after them
(services/dosing/domain.py, `EfficacyNotice`)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from services.dosing import domain, worklist
from services.dosing import holds as holding
from shared.errors import Refused
from shared.events import (
    Arm,
    ArmAssigned,
    AssessmentRecorded,
    AssessmentVisitNoted,
    DeathRecorded,
    DosingDispositionNoted,
    EventData,
    LostToFollowUp,
    PatientWithdrawn,
    StudyCompleted,
    TreatmentDiscontinued,
    VisitMissed,
    VisitsCancelled,
)
from shared.protocol import default_protocol
from shared.web import Problem, refusal_problem

PROTOCOL = default_protocol()
RECORDS = domain.records(PROTOCOL)
RANDOMIZED = datetime(2026, 11, 26, 1, 30, tzinfo=UTC)  # 09:30 on 26 November at the sites
NOW = datetime(2027, 6, 1, tzinfo=UTC)
LATER = RANDOMIZED + timedelta(days=20)


def site_time(day: date, hour: int = 10) -> datetime:
    """`hour` o'clock on `day` at the sites (Asia/Shanghai, UTC+8)."""
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC) - timedelta(hours=8)


def run(history: list[EventData], command: domain.RecordCommand) -> list[EventData]:
    return history + RECORDS.decide(RECORDS.fold(history), command)


def enrolled(arm: Arm = "msc_low") -> list[EventData]:
    """The patient's dosing history once dosing made the assignment's calendar."""
    return run([], domain.StartCalendar(ArmAssigned(
        patient_id="P1", site_id="S1", arm=arm, randomization_number=1, stratum="S1:pasi_lt20",
        baseline_weight_kg=70.0, assigned_at=RANDOMIZED)))


def infusion(week: int, day: date) -> domain.GiveDose:
    return domain.GiveDose(domain.RecordInfusion(
        f"inf-{week}", week, site_time(day), 70.0, 70_000_000, "L-1", None, NOW), holding.Holds())


def methotrexate(week: int, day: date, dose_mg: float) -> domain.GiveDose:
    return domain.GiveDose(domain.RecordMethotrexateDose(
        f"mtx-{week}", week, dose_mg, site_time(day), None, NOW), holding.Holds())


def with_week_0_given() -> list[EventData]:
    """msc_low, the week-0 infusion given on the randomization day (day 0 stays 26 November)."""
    return run(enrolled(), infusion(0, date(2026, 11, 26)))


def notice(history: list[EventData], event: EventData,
           event_id: str = "eff-1") -> list[EventData]:
    return RECORDS.decide(RECORDS.fold(history), domain.EfficacyNotice(event, event_id))


def noticed(history: list[EventData], event: EventData, event_id: str = "eff-1"
            ) -> list[EventData]:
    return history + notice(history, event, event_id)


def refused(history: list[EventData], command: domain.GiveDose) -> Problem:
    with pytest.raises(Refused) as caught:
        run(history, command)
    return refusal_problem(caught.value)


def statuses(history: list[EventData]) -> dict[tuple[str, int], str]:
    return {(s.visit.kind, s.visit.week): s.status for s in domain.fold(history).slots()}


def types(events: list[EventData]) -> list[str]:
    return [e.event_type() for e in events]


def assessed(week: int | None, day: date, assessment_id: str = "a-1") -> AssessmentRecorded:
    return AssessmentRecorded(assessment_id=assessment_id, patient_id="P1", site_id="S1",
                              arm="msc_low", week=week, unscheduled=week is None,
                              assessed_at=site_time(day), assessed_on=day, pasi_total=12.5)


def missed(week: int, kind: str = "assessment") -> VisitMissed:
    due = date(2026, 11, 26) + timedelta(weeks=week)
    return VisitMissed.model_validate({
        "patient_id": "P1", "site_id": "S1", "arm": "msc_low", "week": week, "kind": kind,
        "due_date": due, "window_end": due + timedelta(days=2), "detected_at": LATER})


STOPPED = TreatmentDiscontinued(patient_id="P1", site_id="S1", reason="hepatotoxicity",
                                discontinued_at=LATER, decided_by="dr-who")
DIED = DeathRecorded(patient_id="P1", site_id="S1", adverse_event_id="AE1", reported_at=LATER,
                     source_event_id="safety-1")
LOST = LostToFollowUp(patient_id="P1", site_id="S1", declared_by="efficacy-sweep",
                      reason="2 scheduled assessments missed in a row", missed_weeks=(4, 8),
                      at=LATER)
COMPLETED = StudyCompleted(patient_id="P1", site_id="S1", assessment_id="a-52",
                           completed_at=LATER)
ENDINGS = [(DIED, "died", None), (LOST, "lost_to_follow_up", LOST.reason),
           (COMPLETED, "completed", None)]
ENDING_IDS = ["died", "lost_to_follow_up", "completed"]


# --- assessment visits ------------------------------------------------------------------------


def test_a_scheduled_assessment_marks_its_visit_done() -> None:
    history = enrolled()
    event = assessed(4, date(2026, 12, 24))
    found = notice(history, event, "eff-7")
    assert found == [AssessmentVisitNoted(patient_id="P1", site_id="S1", week=4, status="done",
                                          at=event.assessed_at, source_event_id="eff-7")]
    after = statuses(history + found)
    assert after[("assessment", 4)] == "done"
    assert {s for k, s in after.items() if k != ("assessment", 4)} == {"planned"}
    slot = next(s for s in domain.fold(history + found).slots()
                if (s.visit.kind, s.visit.week) == ("assessment", 4))
    assert worklist.visit_status(slot, date(2027, 1, 1)) is None  # off the worklist for good


def test_an_unscheduled_assessment_marks_nothing() -> None:
    assert notice(enrolled(), assessed(None, date(2026, 12, 10))) == []


def test_a_missed_assessment_marks_its_visit_missed_and_a_late_entry_then_done() -> None:
    history = enrolled()
    found = notice(history, missed(4), "eff-2")
    assert found == [AssessmentVisitNoted(patient_id="P1", site_id="S1", week=4,
                                          status="missed", at=LATER, source_event_id="eff-2")]
    history += found
    assert statuses(history)[("assessment", 4)] == "missed"
    history = noticed(history, assessed(4, date(2026, 12, 26)), "eff-3")  # entered late
    assert statuses(history)[("assessment", 4)] == "done"


def test_a_missed_dose_is_not_efficacys_to_note() -> None:
    assert notice(enrolled(), missed(1, "infusion")) == []


def test_a_repeated_assessment_notice_leaves_the_schedule_as_it_was() -> None:
    history = noticed(enrolled(), assessed(4, date(2026, 12, 24)))
    again = noticed(history, assessed(4, date(2026, 12, 24)))
    assert domain.fold(again) == domain.fold(history)


def test_an_assessment_done_before_the_week_0_dose_stays_done_when_day_0_moves() -> None:
    history = noticed(enrolled(), assessed(0, date(2026, 11, 26)))
    assert statuses(history)[("assessment", 0)] == "done"
    history = run(history, infusion(0, date(2026, 11, 27)))  # day 0 becomes 27 November
    assert types(history)[-1] == "DosingScheduleReanchored"
    assert statuses(history)[("assessment", 0)] == "done"
    slot = next(s for s in domain.fold(history).slots()
                if (s.visit.kind, s.visit.week) == ("assessment", 0))
    assert worklist.visit_status(slot, date(2026, 12, 1)) is None  # not "overdue"


# --- treatment discontinuation ----------------------------------------------------------------


def test_a_treatment_discontinuation_cancels_the_open_doses_and_refuses_the_next() -> None:
    history = with_week_0_given()
    found = notice(history, STOPPED, "eff-4")
    assert types(found) == ["DosingDispositionNoted", "VisitsCancelled"]
    noted, cancelled = found
    assert noted == DosingDispositionNoted(
        patient_id="P1", site_id="S1", disposition="treatment_discontinued", at=LATER,
        reason="hepatotoxicity", source_event_id="eff-4")
    assert isinstance(cancelled, VisitsCancelled)
    assert (cancelled.cause, cancelled.arm, cancelled.cancelled_at) == (
        "treatment_discontinued", "msc_low", LATER)
    assert [(v.kind, v.week) for v in cancelled.visits] == [
        ("infusion", w) for w in (1, 2, 3, 5, 7)]
    history += found
    after = statuses(history)
    assert after[("infusion", 0)] == "given"
    assert {s for (kind, _), s in after.items() if kind == "assessment"} == {"planned"}
    problem = refused(history, infusion(1, date(2026, 12, 3)))
    assert (problem.status, problem.code) == (409, "treatment_discontinued")
    assert domain.fold(history).status == "treatment_discontinued"
    assert notice(history, STOPPED, "eff-5") == []  # once
    # The assessments go on, and dosing still notes them.
    assert types(notice(history, assessed(4, date(2026, 12, 24)))) == ["AssessmentVisitNoted"]


def test_a_discontinued_methotrexate_patients_doses_are_refused_too() -> None:
    history = run(enrolled("mtx"), methotrexate(0, date(2026, 11, 26), 7.5))
    history = noticed(history, STOPPED)
    cancelled = history[-1]
    assert isinstance(cancelled, VisitsCancelled)
    assert [v.week for v in cancelled.visits] == list(range(1, 16))
    assert {v.kind for v in cancelled.visits} == {"methotrexate"}
    assert refused(history, methotrexate(1, date(2026, 12, 3), 10.0)).code == (
        "treatment_discontinued")


def test_a_discontinuation_with_no_dose_left_open_is_noted_alone() -> None:
    history = enrolled()
    history = run(history, domain.MarkMissed(site_time(date(2027, 2, 1)), holding.Holds()))
    assert {s for (k, _), s in statuses(history).items() if k == "infusion"} == {"missed"}
    assert types(notice(history, STOPPED)) == ["DosingDispositionNoted"]


# --- the end of the study ---------------------------------------------------------------------


@pytest.mark.parametrize(("ending", "disposition", "reason"), ENDINGS, ids=ENDING_IDS)
def test_the_end_of_the_study_cancels_every_open_visit(
        ending: EventData, disposition: str, reason: str | None) -> None:
    history = noticed(with_week_0_given(), assessed(0, date(2026, 11, 26)), "eff-0")
    found = notice(history, ending, "eff-9")
    assert types(found) == ["DosingDispositionNoted", "VisitsCancelled"]
    noted, cancelled = found
    assert noted == DosingDispositionNoted(patient_id="P1", site_id="S1", disposition=disposition,
                                           at=LATER, reason=reason, source_event_id="eff-9")
    assert isinstance(cancelled, VisitsCancelled)
    assert (cancelled.cause, cancelled.cancelled_at) == (disposition, LATER)
    assert sorted((v.kind, v.week) for v in cancelled.visits) == sorted(
        [("infusion", w) for w in (1, 2, 3, 5, 7)]
        + [("assessment", w) for w in (4, 8, 12, 16, 24, 36, 52)])
    history += found
    after = statuses(history)
    assert (after[("infusion", 0)], after[("assessment", 0)]) == ("given", "done")
    assert {s for k, s in after.items() if k not in (("infusion", 0), ("assessment", 0))} == {
        "cancelled"}
    record = domain.fold(history)
    assert (record.status, record.study_ended) == (disposition, disposition)
    problem = refused(history, infusion(1, date(2026, 12, 3)))
    assert (problem.status, problem.code, problem.extra["disposition"]) == (
        409, "study_ended", disposition)
    # Once: neither a repeat nor another ending nor a discontinuation adds anything.
    for later in (ending, DIED, LOST, COMPLETED, STOPPED):
        assert notice(history, later, "eff-10") == []


def test_a_death_after_a_discontinuation_cancels_the_assessments_left() -> None:
    history = noticed(with_week_0_given(), STOPPED, "eff-1")
    found = notice(history, DIED, "eff-2")
    assert types(found) == ["DosingDispositionNoted", "VisitsCancelled"]
    cancelled = found[1]
    assert isinstance(cancelled, VisitsCancelled) and cancelled.cause == "died"
    assert {v.kind for v in cancelled.visits} == {"assessment"} and len(cancelled.visits) == 8
    history += found
    record = domain.fold(history)
    assert (record.status, record.treatment_discontinued) == ("died", True)
    assert refused(history, infusion(1, date(2026, 12, 3))).code == "study_ended"


# --- patients dosing cannot act on ------------------------------------------------------------


ALL_NOTICES = [assessed(4, date(2026, 12, 24)), missed(4), STOPPED, DIED, LOST, COMPLETED]
ALL_IDS = ["assessed", "missed", "discontinued", "died", "lost", "completed"]


@pytest.mark.parametrize("event", ALL_NOTICES, ids=ALL_IDS)
def test_nothing_for_a_patient_dosing_does_not_know(event: EventData) -> None:
    assert notice([], event) == []


@pytest.mark.parametrize("event", [STOPPED, DIED, LOST, COMPLETED], ids=ALL_IDS[2:])
def test_no_disposition_is_noted_after_a_withdrawal(event: EventData) -> None:
    history = run(with_week_0_given(), domain.EndForWithdrawal(PatientWithdrawn(
        patient_id="P1", site_id="S1", reason="moved away", withdrawn_at=RANDOMIZED)))
    assert notice(history, event) == []
    assert domain.fold(history).status == "withdrawn"
    assert refused(history, infusion(1, date(2026, 12, 3))).code == "withdrawn"
