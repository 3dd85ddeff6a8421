"""Given patients' dosing records (folded from their dosing events), when a site asks for its
worklists on some day, then these visits and patients, paged (services/dosing/worklist.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given as given_examples
from hypothesis import settings
from hypothesis import strategies as st

from services.dosing import domain, worklist
from services.dosing import holds as holding
from shared.errors import Refused
from shared.events import (
    Arm,
    ArmAssigned,
    AssessmentRecorded,
    EventData,
    PatientWithdrawn,
    StudyCompleted,
    TreatmentDiscontinued,
)
from shared.protocol import default_protocol
from shared.web import refusal_problem

PROTOCOL = default_protocol()
RECORDS = domain.records(PROTOCOL)
RANDOMIZED = datetime(2026, 11, 26, 1, 30, tzinfo=UTC)  # 09:30 on 26 November at the sites
NOW = datetime(2027, 6, 1, tzinfo=UTC)
WEEK_0_CLOSED = datetime(2026, 11, 28, 16, 0, tzinfo=UTC)  # 00:00 on the 29th at the sites


def site_time(day: date, hour: int = 10) -> datetime:
    """`hour` o'clock on `day` at the sites (Asia/Shanghai, UTC+8)."""
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC) - timedelta(hours=8)


def enrolled(patient_id: str, arm: Arm = "msc_low", randomized: datetime = RANDOMIZED,
             site: str = "S1") -> list[EventData]:
    """A patient's dosing history once dosing made the calendar of the assignment."""
    return run([], domain.StartCalendar(ArmAssigned(
        patient_id=patient_id, site_id=site, arm=arm, randomization_number=1,
        stratum=f"{site}:pasi_lt20", baseline_weight_kg=70.0, assigned_at=randomized)))


def run(history: list[EventData], command: domain.RecordCommand) -> list[EventData]:
    """The history after the dosing decider took the command."""
    return history + RECORDS.decide(RECORDS.fold(history), command)


def swept(history: list[EventData], now: datetime) -> list[EventData]:
    return run(history, domain.MarkMissed(now, holding.Holds()))


def noticed(history: list[EventData], event: EventData) -> list[EventData]:
    return run(history, domain.EfficacyNotice(event, f"eff-{len(history)}"))


def records(*histories: list[EventData]) -> list[domain.DosingRecord]:
    return [domain.fold(h) for h in histories]


def on(instant: datetime) -> Callable[[str], date]:
    """The sites' today at `instant`, as the API passes it."""
    return lambda site: PROTOCOL.site_date(site, instant)


def visits(found: list[domain.DosingRecord], instant: datetime, start: date | None = None,
           end: date | None = None, status: worklist.VisitFilter | None = None,
           limit: int = 1000, cursor: str | None = None) -> worklist.Page:
    return worklist.visits(found, on(instant), start, end, status, limit, cursor)


def listed(page: worklist.Page) -> list[tuple[str, str, int, str]]:
    """(patient, kind, week, status) of each item, in order."""
    return [(i["patient_id"], i["kind"], i["week"], i["status"]) for i in page.items]


def every_page(fetch: Callable[[str | None], worklist.Page]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        page = fetch(cursor)
        items += page.items
        if page.next_cursor is None:
            return items
        assert page.items, "a page with a next cursor is never empty"
        cursor = page.next_cursor
    raise AssertionError("paging never ended")


def stopped(patient_id: str) -> TreatmentDiscontinued:
    return TreatmentDiscontinued(patient_id=patient_id, site_id="S1", reason="hepatotoxicity",
                                 discontinued_at=RANDOMIZED + timedelta(days=1),
                                 decided_by="dr-who")


# --- statuses on the site's today -------------------------------------------------------------


def week_0_infusion(page: worklist.Page) -> str | None:
    return next((i["status"] for i in page.items
                 if (i["kind"], i["week"]) == ("infusion", 0)), None)


def test_a_visit_is_due_to_its_window_end_overdue_the_next_site_day_then_missed() -> None:
    history = enrolled("P1")  # week 0's window: 26 to 28 November
    last_minute = WEEK_0_CLOSED - timedelta(minutes=1)  # 23:59 on the 28th at the sites
    assert week_0_infusion(visits(records(history), last_minute)) == "due"
    # Still the 28th in UTC, already the 29th at the sites.
    assert WEEK_0_CLOSED.date() == date(2026, 11, 28)
    assert week_0_infusion(visits(records(history), WEEK_0_CLOSED)) == "overdue"
    history = swept(history, WEEK_0_CLOSED)
    assert week_0_infusion(visits(records(history), WEEK_0_CLOSED)) == "missed"
    slot = next(s for s in domain.fold(history).slots() if s.visit.kind == "infusion")
    assert worklist.visit_status(slot, date(2026, 11, 28)) == "missed"  # whatever the day


def test_an_item_names_the_visit_in_the_sites_dates() -> None:
    item = next(i for i in visits(records(enrolled("P1")), RANDOMIZED).items
                if (i["kind"], i["week"]) == ("infusion", 1))
    assert item == {"patient_id": "P1", "site_id": "S1", "arm": "msc_low", "week": 1,
                    "kind": "infusion", "due_date": "2026-12-03", "window_start": "2026-12-01",
                    "window_end": "2026-12-05", "status": "due"}


def scene() -> list[domain.DosingRecord]:
    """On 6 December at the sites: P1's week-0 infusion swept as missed, its week-0 assessment
    and week-1 infusion overdue; P2 (methotrexate) got week 0 on time, and efficacy recorded its
    week-0 assessment."""
    p1 = swept(enrolled("P1"), WEEK_0_CLOSED)
    p2 = run(enrolled("P2", "mtx"), domain.GiveDose(domain.RecordMethotrexateDose(
        "mtx-0", 0, 7.5, site_time(date(2026, 11, 26)), None, NOW), holding.Holds()))
    p2 = noticed(p2, _week_0_assessed("P2"))
    return records(p1, p2)


def _week_0_assessed(patient_id: str) -> EventData:
    return AssessmentRecorded(assessment_id="a-0", patient_id=patient_id, site_id="S1",
                              arm="mtx", week=0, unscheduled=False,
                              assessed_at=site_time(date(2026, 11, 26)),
                              assessed_on=date(2026, 11, 26), pasi_total=20.0)


DEC_6 = site_time(date(2026, 12, 6))


def test_the_missed_filter_is_what_was_recorded_missed() -> None:
    assert listed(visits(scene(), DEC_6, status="missed")) == [("P1", "infusion", 0, "missed")]


def test_the_overdue_filter_takes_in_the_missed_ones() -> None:
    assert listed(visits(scene(), DEC_6, status="overdue")) == [
        ("P1", "assessment", 0, "overdue"), ("P1", "infusion", 0, "missed"),
        ("P1", "infusion", 1, "overdue"), ("P2", "methotrexate", 1, "overdue")]


def test_the_due_filter_is_what_is_still_open() -> None:
    due = visits(scene(), DEC_6, status="due").items
    assert due and {i["status"] for i in due} == {"due"}
    assert all(i["window_end"] >= "2026-12-06" for i in due)
    assert ("P1", "infusion", 2, "due") in listed(visits(scene(), DEC_6, status="due"))
    everything = visits(scene(), DEC_6)
    assert len(everything.items) == len(due) + 4
    # Given and done visits are off every worklist.
    assert not {("P2", "methotrexate", 0), ("P2", "assessment", 0)} & {
        (p, k, w) for p, k, w, _ in listed(everything)}


def test_from_and_to_filter_by_due_date_both_inclusive() -> None:
    found = scene()[:1]  # P1: infusions due 3 and 10 December, nothing between
    assert listed(visits(found, DEC_6, date(2026, 12, 3), date(2026, 12, 10))) == [
        ("P1", "infusion", 1, "overdue"), ("P1", "infusion", 2, "due")]
    assert visits(found, DEC_6, date(2026, 12, 4), date(2026, 12, 9)).items == []
    assert listed(visits(found, DEC_6, date(2026, 12, 10), date(2026, 12, 10))) == [
        ("P1", "infusion", 2, "due")]
    since = visits(found, DEC_6, start=date(2027, 5, 20)).items
    assert [(i["kind"], i["week"], i["due_date"]) for i in since] == [
        ("assessment", 36, "2027-08-05"), ("assessment", 52, "2027-11-25")]
    until = visits(found, DEC_6, end=date(2026, 11, 26)).items
    assert [(i["kind"], i["week"]) for i in until] == [("assessment", 0), ("infusion", 0)]
    overdue_then = visits(found, DEC_6, date(2026, 12, 1), None, "overdue")
    assert listed(overdue_then) == [("P1", "infusion", 1, "overdue")]


# --- paging -----------------------------------------------------------------------------------


def cohort() -> list[domain.DosingRecord]:
    return records(
        swept(enrolled("P1"), WEEK_0_CLOSED),
        enrolled("P2", "mtx", RANDOMIZED + timedelta(days=1)),
        enrolled("P3", "msc_high", RANDOMIZED, site="S2"),
        run(enrolled("P4", "msc_high"), domain.EndForWithdrawal(PatientWithdrawn(
            patient_id="P4", site_id="S1", reason="moved", withdrawn_at=RANDOMIZED))),
    )


def test_visits_are_ordered_by_due_date_patient_week_and_kind() -> None:
    items = visits(cohort(), DEC_6).items
    keys = [(i["due_date"], i["patient_id"], i["week"], i["kind"]) for i in items]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert {i["patient_id"] for i in items} == {"P1", "P2", "P3"}  # P4 withdrew: nothing open
    assert len(items) == (6 + 8) * 2 + 16 + 8


@settings(max_examples=40, deadline=None)
@given_examples(limit=st.integers(1, 60), status=st.sampled_from([None, "due", "overdue"]))
def test_paging_returns_every_visit_once_in_order(limit: int, status: str | None) -> None:
    found = cohort()
    whole = visits(found, DEC_6, status=status)  # type: ignore[arg-type]
    assert whole.next_cursor is None
    paged = every_page(lambda cursor: visits(found, DEC_6, status=status,  # type: ignore[arg-type]
                                             limit=limit, cursor=cursor))
    assert paged == whole.items
    first = visits(found, DEC_6, status=status, limit=limit)  # type: ignore[arg-type]
    assert len(first.items) == min(limit, len(whole.items))
    assert (first.next_cursor is None) == (limit >= len(whole.items))


@settings(max_examples=20, deadline=None)
@given_examples(limit=st.integers(1, 6))
def test_paging_returns_every_patient_once_in_order(limit: int) -> None:
    found = cohort()
    paged = every_page(lambda cursor: worklist.patients(found, on(DEC_6), None, limit, cursor))
    assert [p["patient_id"] for p in paged] == ["P1", "P2", "P3", "P4"]


@pytest.mark.parametrize("cursor", [
    "not a cursor!", "bm90IGpzb24=", "WyIyMDI2LTEy", "eyJhIjogMX0="],
    # not base64; base64 of `not json`; of `["2026-12` (cut short); of `{"a": 1}`
    ids=["not_base64", "not_json", "truncated", "not_a_list"])
def test_a_cursor_the_api_did_not_give_is_refused(cursor: str) -> None:
    for fetch in (lambda: visits(cohort(), DEC_6, cursor=cursor),
                  lambda: worklist.patients(cohort(), on(DEC_6), None, 10, cursor)):
        with pytest.raises(Refused) as caught:
            fetch()
        problem = refusal_problem(caught.value)
        assert (problem.status, problem.code) == (422, "bad_cursor")


def test_a_well_formed_cursor_of_another_shape_is_refused() -> None:
    with pytest.raises(Refused) as caught:
        visits(cohort(), DEC_6, cursor=worklist.encode_cursor((1,)))
    assert caught.value.code == "bad_cursor"


# --- patients ---------------------------------------------------------------------------------


def test_an_active_patients_next_visit_is_the_earliest_still_open() -> None:
    history = enrolled("P1")
    on_day_0 = worklist.patients(records(history), on(RANDOMIZED), None, 10, None).items
    assert on_day_0[0]["next_visit"] == {  # the assessment before the dose of the same day
        "arm": "msc_low", "week": 0, "kind": "assessment", "due_date": "2026-11-26",
        "window_start": "2026-11-26", "window_end": "2026-11-28", "status": "due"}
    assert on_day_0[0]["visits_overdue"] == 0
    item = worklist.patients(records(swept(history, WEEK_0_CLOSED)), on(WEEK_0_CLOSED),
                             None, 10, None).items[0]
    assert (item["patient_id"], item["site_id"], item["arm"], item["status"]) == (
        "P1", "S1", "msc_low", "active")
    assert (item["next_visit"]["kind"], item["next_visit"]["week"],
            item["next_visit"]["due_date"]) == ("infusion", 1, "2026-12-03")
    assert item["visits_overdue"] == 2  # the infusion missed, the assessment overdue


def status_scene() -> list[domain.DosingRecord]:
    return [*records(
        enrolled("P1"),
        noticed(enrolled("P2"), stopped("P2")),
        run(enrolled("P3"), domain.EndForWithdrawal(PatientWithdrawn(
            patient_id="P3", site_id="S1", reason="moved", withdrawn_at=RANDOMIZED))),
        noticed(enrolled("P4"), StudyCompleted(patient_id="P4", site_id="S1", assessment_id="a",
                                               completed_at=RANDOMIZED + timedelta(days=1)))),
        domain.DosingRecord()]  # a record with no calendar is no one's


def test_each_patient_has_a_status_and_a_next_visit_to_match() -> None:
    items = worklist.patients(status_scene(), on(site_time(date(2026, 12, 6))), None, 10,
                              None).items
    by_id = {i["patient_id"]: i for i in items}
    assert list(by_id) == ["P1", "P2", "P3", "P4"]
    assert {p: i["status"] for p, i in by_id.items()} == {
        "P1": "active", "P2": "treatment_discontinued", "P3": "withdrawn", "P4": "completed"}
    assert by_id["P1"]["next_visit"]["kind"] == "infusion"
    # No more doses: the next visit is an assessment, which goes on.
    assert (by_id["P2"]["next_visit"]["kind"], by_id["P2"]["next_visit"]["week"]) == (
        "assessment", 4)
    assert by_id["P3"]["next_visit"] is None and by_id["P4"]["next_visit"] is None
    assert by_id["P3"]["visits_overdue"] == by_id["P4"]["visits_overdue"] == 0


@pytest.mark.parametrize("status", ["active", "treatment_discontinued", "withdrawn", "completed"])
def test_the_status_filter_lists_only_patients_with_that_status(status: str) -> None:
    items = worklist.patients(status_scene(), on(DEC_6), status, 10, None).items
    assert [i["status"] for i in items] == [status]
    assert worklist.patients(status_scene(), on(DEC_6), "died", 10, None).items == []
