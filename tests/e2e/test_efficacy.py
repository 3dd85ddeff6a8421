"""Efficacy end to end through the gateway, on a system of its own whose dosing and efficacy read
"now" from a file the tests move (TRIAL_CLOCK_FILE) and sweep for missed visits every 0.3 s:
a patient followed to week 52, missed and done assessment visits, treatment discontinuation and
the summary's NRI, withdrawal, corrections, the site worklists, and readiness.

Randomization reads the wall clock, so every patient's calendar starts on today's date at the
site (Asia/Shanghai); each test moves the file clock back to the wall clock before it enrols
anyone, then to each visit, computed from the dates of the patient's own schedule. Allocation
is random: nothing here depends on the arm a patient gets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from shared.clock import FileClock
from tests.e2e.conftest import client, screening, system_of_its_own
from tests.e2e.test_catch_up import not_caught_up_or
from tests.e2e.test_dosing_patients import schedule_of
from tests.support import eventually
from tooling.launcher import System

SITE_ZONE = ZoneInfo("Asia/Shanghai")  # S1 and S2 in the protocol
WAIT = 120.0  # seconds any eventually-consistent view may take


@dataclass
class Trial:
    system: System
    clock: FileClock

    def at(self, when: datetime) -> datetime:
        """Move dosing's and efficacy's clock to `when`."""
        self.clock.set(when)
        return when

    def back_to_today(self) -> None:
        """The wall clock again: a patient enrolled now has nothing due in the clock's past."""
        self.clock.set(datetime.now(UTC))


@pytest.fixture(scope="module")
def trial(pg_dsn: str | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trial]:
    folder = tmp_path_factory.mktemp("efficacy")
    clock = FileClock(folder / "clock.txt")
    clock.set(datetime.now(UTC))  # before any process reads it
    with system_of_its_own(pg_dsn, folder, env={
            "TRIAL_CLOCK_FILE": str(clock.path),
            "TRIAL_EFFICACY_SWEEP_INTERVAL_S": "0.3",
            "TRIAL_DOSING_SWEEP_INTERVAL_S": "0.3"}) as system:
        yield Trial(system, clock)


# --- helpers ------------------------------------------------------------------------------------


def local(day: str | date, hour: int, minute: int = 0) -> datetime:
    """That wall time at the sites (Asia/Shanghai), as a UTC instant."""
    d = date.fromisoformat(day) if isinstance(day, str) else day
    return datetime.combine(d, time(hour, minute), SITE_ZONE).astimezone(UTC)


def day_after(day: str) -> date:
    return date.fromisoformat(day) + timedelta(days=1)


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert (r.status_code, r.headers["content-type"]) == (status, "application/problem+json"), \
        r.text
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    return body


def ok(r: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    return body


async def new_patient(site: httpx.AsyncClient, site_id: str = "S1") -> tuple[str, str]:
    """(patient id, arm) of a patient screened, enrolled and randomized now, whatever the arm."""
    r = await site.post("/v1/screenings", json=screening(site=site_id))
    assert r.status_code == 201 and r.json()["eligible"], r.text
    patient_id = ok(await site.post("/v1/patients",
                                    json={"screening_id": r.json()["screening_id"]}), 201)
    patient = str(patient_id["patient_id"])
    assigned = ok(await site.post(f"/v1/patients/{patient}/randomization"), 201)
    return patient, str(assigned["arm"])


def assessment_visits(schedule: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {v["week"]: v for v in schedule["visits"] if v["kind"] == "assessment"}


def dose_visits(schedule: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted((v for v in schedule["visits"] if v["kind"] != "assessment"),
                  key=lambda v: v["week"])


def dose_request(visit: dict[str, Any], given_at: datetime) -> tuple[str, dict[str, Any]]:
    """The dose the schedule plans for this visit (an infusion or a methotrexate dose)."""
    if visit["kind"] == "infusion":
        return "infusions", {"week": visit["week"], "given_at": given_at.isoformat(),
                             "weight_kg": 70.0, "cells_administered": visit["planned_cells"],
                             "lot_number": "L-EFF-1", "deviation_reason": None}
    assert visit["kind"] == "methotrexate", visit
    return "methotrexate-doses", {"week": visit["week"], "dose_mg": visit["planned_dose_mg"],
                                  "given_at": given_at.isoformat()}


async def give_dose(site: httpx.AsyncClient, patient_id: str, visit: dict[str, Any],
                    given_at: datetime) -> httpx.Response:
    kind, body = dose_request(visit, given_at)
    return await site.post(f"/v1/patients/{patient_id}/{kind}", json=body)


def assessment(week: int | None, assessed_at: datetime, pasi: float | dict[str, Any],
               **more: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"assessed_at": assessed_at.isoformat(),
                            "pasi": pasi if isinstance(pasi, dict) else {"total": pasi}, **more}
    if week is None:
        body["unscheduled"] = True
    else:
        body["week"] = week
    return body


async def assess(trial: Trial, site: httpx.AsyncClient, patient_id: str, visit: dict[str, Any],
                 pasi: float | dict[str, Any], when: datetime | None = None,
                 **more: Any) -> httpx.Response:
    """Assess at `when` (by default the visit's due date, 10:00 at the site) with the clock a
    minute later: an assessment in the clock's future is refused."""
    at = when or local(visit["due_date"], 10)
    trial.at(at + timedelta(minutes=1))
    return await site.post(f"/v1/patients/{patient_id}/assessments",
                           json=assessment(visit["week"], at, pasi, **more))


async def efficacy_of(reader: httpx.AsyncClient, patient_id: str) -> dict[str, Any]:
    return ok(await reader.get(f"/v1/patients/{patient_id}/efficacy"))


async def efficacy_until(reader: httpx.AsyncClient, patient_id: str, until: Any,
                         what: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        r = await reader.get(f"/v1/patients/{patient_id}/efficacy")
        if r.status_code != 200:
            return None
        body: dict[str, Any] = r.json()
        return body if until(body) else None

    found: dict[str, Any] = await eventually(check, timeout=WAIT, what=what)
    return found


def efficacy_visit(view: dict[str, Any], week: int) -> dict[str, Any]:
    found: dict[str, Any] = next(v for v in view["visits"] if v["week"] == week)
    return found


def schedule_status(schedule: dict[str, Any], week: int, kind: str = "assessment") -> str:
    return str(next(v["status"] for v in schedule["visits"]
                    if (v["week"], v["kind"]) == (week, kind)))


async def every_item(reader: httpx.AsyncClient, path: str, **params: str) -> list[dict[str, Any]]:
    """Every item of a worklist, following its cursor."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = {**params, "limit": "500", **({"cursor": cursor} if cursor else {})}
        body = ok(await reader.get(path, params=query))
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items


def visit_keys(items: list[dict[str, Any]]) -> dict[tuple[str, int, str], str]:
    """(patient, week, kind) -> worklist status."""
    return {(i["patient_id"], i["week"], i["kind"]): i["status"] for i in items}


async def arm_week(monitor: httpx.AsyncClient, arm: str, week: int) -> dict[str, Any]:
    body = ok(await monitor.get("/v1/efficacy/summary"))
    found: dict[str, Any] = body["arms"][arm]["weeks"][str(week)]
    return found


# --- the tests ----------------------------------------------------------------------------------


async def test_the_gateway_reports_efficacy_ready(trial: Trial) -> None:
    async with httpx.AsyncClient(base_url=trial.system.url(), timeout=30) as anyone:
        body = ok(await anyone.get("/readyz"))
    assert body["status"] == "ready"
    assert body["services"]["efficacy"]["ready"] is True, body


# The contract's example assessment: PASI 23.8 from its regions, DLQI 9 from its items.
CONTRACT_REGIONS = {"regions": {
    "head": {"erythema": 2, "induration": 1, "desquamation": 1, "area": 2},
    "upper_limbs": {"erythema": 3, "induration": 2, "desquamation": 2, "area": 3},
    "trunk": {"erythema": 2, "induration": 2, "desquamation": 1, "area": 4},
    "lower_limbs": {"erythema": 3, "induration": 3, "desquamation": 2, "area": 4}}}
CONTRACT_DLQI = {"items": [2, 1, 1, 0, 2, 1, 0, 1, 1, 0]}
# Week -> PASI after the baseline of 23.8, and where in its window (the site's dates) it is taken.
COURSE: dict[int, tuple[float, str, int]] = {
    4: (17.85, "window_start", 8), 8: (11.9, "due_date", 12), 12: (5.95, "window_end", 23),
    16: (2.38, "window_start", 8), 24: (0.0, "due_date", 12), 36: (1.2, "window_end", 23),
    52: (3.5, "window_end", 23)}


async def test_a_patient_assessed_at_every_week_to_52_completes_the_study(trial: Trial) -> None:
    trial.back_to_today()
    async with client(trial.system) as site, client(trial.system, "monitor") as monitor:
        patient_id, arm = await new_patient(site)
        visits = assessment_visits(await schedule_of(site, patient_id))
        assert sorted(visits) == [0, 4, 8, 12, 16, 24, 36, 52]

        first = ok(await assess(trial, site, patient_id, visits[0], CONTRACT_REGIONS,
                                local(visits[0]["window_start"], 8), bsa_percent=18.0,
                                dlqi=CONTRACT_DLQI, spga=3), 201)
        assert (first["pasi_total"], first["dlqi_total"], first["baseline_pasi"]) == (23.8, 9, 23.8)
        assert first["pasi_percent_improvement"] == 0.0 and first["study_completed"] is False

        answers = {0: first}
        for week, (pasi, where, hour) in COURSE.items():
            at = local(visits[week][where], hour)
            v = visits[week]
            assert v["window_start"] <= at.astimezone(SITE_ZONE).date().isoformat() \
                <= v["window_end"]
            answers[week] = ok(await assess(trial, site, patient_id, v, pasi, at, spga=1), 201)
            assert answers[week]["study_completed"] is (week == 52), answers[week]

        # By hand, from the week-0 baseline of 23.8 (the exact PASI, whatever is displayed):
        # week 4: (23.8 - 17.85) / 23.8 = 25 %, shown as PASI 17.9 (one decimal, half up);
        # week 12: 5.95 is exactly a quarter of 23.8: 75 %, PASI 75 reached, not 90;
        # week 16: (23.8 - 2.38) / 23.8 = 90 % exactly: PASI 90; week 24: 0 is PASI 100;
        # week 36: 22.6 / 23.8 = 94.96 % -> 95.0; week 52: 20.3 / 23.8 = 85.29 % -> 85.3.
        view = await efficacy_of(site, patient_id)
        by_week = {a["week"]: a for a in view["assessments"]}
        assert sorted(by_week) == [0, 4, 8, 12, 16, 24, 36, 52]
        assert view["baseline"] == {"source": "week_0", "pasi": 23.8, "bsa_percent": 18.0,
                                    "dlqi": 9}
        expected = {0: (23.8, 0.0), 4: (17.9, 25.0), 8: (11.9, 50.0), 12: (6.0, 75.0),
                    16: (2.4, 90.0), 24: (0.0, 100.0), 36: (1.2, 95.0), 52: (3.5, 85.3)}
        assert {w: (a["pasi_total"], a["pasi_percent_improvement"])
                for w, a in by_week.items()} == expected
        assert [by_week[12][f"pasi{t}"] for t in (50, 75, 90, 100)] == [True, True, False, False]
        assert [by_week[16][f"pasi{t}"] for t in (50, 75, 90, 100)] == [True, True, True, False]
        assert [by_week[24][f"pasi{t}"] for t in (50, 75, 90, 100)] == [True, True, True, True]
        assert [by_week[4][f"pasi{t}"] for t in (50, 75, 90, 100)] == [False] * 4
        assert all(a["baseline_pasi"] == 23.8 and a["after_treatment_discontinued"] is False
                   for a in view["assessments"])
        assert {v["week"]: v["status"] for v in view["visits"]} == dict.fromkeys(visits, "done")
        assert view["disposition"]["study"] == "completed"
        assert view["arm"] == arm

        # Randomization and dosing learn it from trial.efficacy.
        async def completed() -> bool:
            r = await monitor.get(f"/v1/patients/{patient_id}")
            return r.status_code == 200 and r.json()["disposition"]["study"] == "completed"

        await eventually(completed, timeout=WAIT, what="randomization to learn the completion")
        patient = ok(await site.get(f"/v1/patients/{patient_id}"))
        assert patient["disposition"]["treatment"] == "ongoing"
        assert patient["disposition"]["study_ended_at"] is not None

        def all_done(s: dict[str, Any]) -> bool:
            return all(v["status"] == "done" for v in s["visits"] if v["kind"] == "assessment")

        calendar = await schedule_of(site, patient_id, until=all_done)
        assert sorted(v["week"] for v in calendar["visits"]
                      if v["kind"] == "assessment" and v["status"] == "done") == sorted(visits)

        # The study has ended: nothing more is recorded.
        assert_problem(await site.post(f"/v1/patients/{patient_id}/assessments", json=assessment(
            None, trial.clock.now(), 3.0)), 409, "study_ended")


async def test_a_week_4_window_that_closes_unassessed_is_missed(trial: Trial) -> None:
    trial.back_to_today()
    async with client(trial.system) as site:
        patient_id, _ = await new_patient(site)
        visits = assessment_visits(await schedule_of(site, patient_id))
        ok(await assess(trial, site, patient_id, visits[0], 18.0), 201)

        # 23:30 at the site on the last day of week 4's window: not missed yet.
        trial.at(local(visits[4]["window_end"], 23, 30))
        view = await efficacy_until(site, patient_id,
                                    lambda b: efficacy_visit(b, 0)["status"] == "done",
                                    "week 0 done")
        assert efficacy_visit(view, 4)["status"] == "planned"

        # 00:30 at the site the next day (16:30 UTC of window_end): the sweep marks it missed.
        trial.at(local(day_after(visits[4]["window_end"]), 0, 30))
        view = await efficacy_until(site, patient_id,
                                    lambda b: efficacy_visit(b, 4)["status"] == "missed",
                                    "week 4 missed on the efficacy view")
        assert efficacy_visit(view, 0)["status"] == "done"
        assert efficacy_visit(view, 8)["status"] == "planned"
        assert view["disposition"]["study"] == "ongoing"  # one missed visit is not lost

        calendar = await schedule_of(site, patient_id, until=lambda s: schedule_status(s, 4)
                                     == "missed")
        assert schedule_status(calendar, 0) == "done"
        assert schedule_status(calendar, 8) == "planned"

        # Inside its window, recorded once it closed: accepted (a late entry) and done.
        late = ok(await site.post(f"/v1/patients/{patient_id}/assessments", json=assessment(
            4, local(visits[4]["window_end"], 20), 9.0)), 201)
        assert late["pasi_percent_improvement"] == 50.0 and late["pasi50"] is True
        view = await efficacy_of(site, patient_id)
        assert efficacy_visit(view, 4)["status"] == "done"
        await schedule_of(site, patient_id, until=lambda s: schedule_status(s, 4) == "done")


async def test_after_treatment_discontinuation_no_dose_but_assessments_count_as_observed_only(
        trial: Trial) -> None:
    trial.back_to_today()
    async with client(trial.system) as site, client(trial.system, "investigator") as pi, \
            client(trial.system, "monitor") as monitor:
        patient_id, arm = await new_patient(site)
        schedule = await schedule_of(site, patient_id)
        visits = assessment_visits(schedule)
        doses = dose_visits(schedule)
        # The first dose on its due date (day 0 stays where it is), then the baseline.
        trial.at(local(doses[0]["due_date"], 9, 1))
        ok(await give_dose(site, patient_id, doses[0], local(doses[0]["due_date"], 9)), 201)
        ok(await assess(trial, site, patient_id, visits[0], 20.0), 201)

        trial.at(local(visits[0]["due_date"], 11))
        assert_problem(await site.post(f"/v1/patients/{patient_id}/treatment-discontinuation",
                                       json={"reason": "grade 3 infusion reaction"}),
                       403, "forbidden")  # the investigator's decision
        stopped = ok(await pi.post(f"/v1/patients/{patient_id}/treatment-discontinuation",
                                   json={"reason": "grade 3 infusion reaction"}))
        assert stopped["disposition"]["treatment"] == "discontinued"
        assert stopped["disposition"]["study"] == "ongoing"

        # Once dosing has the event, a later dose is refused.
        async def dosing_knows() -> bool:
            items = await every_item(site, "/v1/patients", site="S1")
            return any(i["patient_id"] == patient_id and i["status"] == "treatment_discontinued"
                       for i in items)

        await eventually(dosing_knows, timeout=WAIT, what="dosing to learn the discontinuation")
        second = doses[1]
        trial.at(local(second["due_date"], 9, 1))
        assert_problem(await give_dose(site, patient_id, second, local(second["due_date"], 9)),
                       409, "treatment_discontinued")
        calendar = await schedule_of(site, patient_id)
        assert schedule_status(calendar, doses[0]["week"], doses[0]["kind"]) == "given"
        assert {v["status"] for v in dose_visits(calendar)[1:]} == {"cancelled"}
        assert {v["status"] for v in calendar["visits"] if v["kind"] == "assessment"} \
            == {"done", "planned"}  # the assessments go on

        # Week 4: PASI 4 from 20 is an 80 % improvement, PASI 75, after discontinuation.
        before = await arm_week(monitor, arm, 4)
        week4 = ok(await assess(trial, site, patient_id, visits[4], 4.0), 201)
        assert week4["after_treatment_discontinued"] is True
        assert (week4["pasi_percent_improvement"], week4["pasi75"]) == (80.0, True)
        after = await arm_week(monitor, arm, 4)
        assert after["assessed"] == before["assessed"] + 1
        for t in ("pasi50", "pasi75"):
            # observed: those assessed, as they are; nri: a response after it is no response
            assert after["observed"][t]["count"] == before["observed"][t]["count"] + 1
            assert after["observed"][t]["n"] == before["observed"][t]["n"] + 1
            assert after["nri"][t]["count"] == before["nri"][t]["count"]
            assert after["nri"][t]["n"] == before["nri"][t]["n"]  # everyone randomized
        assert after["observed"]["pasi90"]["count"] == before["observed"]["pasi90"]["count"]

        week8 = ok(await assess(trial, site, patient_id, visits[8], 6.0), 201)
        assert week8["after_treatment_discontinued"] is True
        view = await efficacy_of(site, patient_id)
        assert [(a["week"], a["after_treatment_discontinued"]) for a in view["assessments"]] \
            == [(0, False), (4, True), (8, True)]
        assert view["disposition"]["treatment"] == "discontinued"

        async def randomization_knows() -> bool:
            r = await site.get(f"/v1/patients/{patient_id}")
            return r.status_code == 200 and r.json()["disposition"]["treatment"] == "discontinued"

        await eventually(randomization_knows, timeout=WAIT,
                         what="randomization to learn the discontinuation")
        assert ok(await site.get(f"/v1/patients/{patient_id}"))["disposition"]["study"] \
            == "ongoing"


async def test_a_withdrawn_patients_assessment_is_refused(trial: Trial) -> None:
    trial.back_to_today()
    async with client(trial.system) as site:
        patient_id, _ = await new_patient(site)
        visits = assessment_visits(await schedule_of(site, patient_id))
        week0 = ok(await assess(trial, site, patient_id, visits[0], 15.0), 201)
        ok(await site.post(f"/v1/patients/{patient_id}/withdrawal",
                           json={"reason": "withdrew consent"}))

        view = await efficacy_until(site, patient_id,
                                    lambda b: b["disposition"]["study"] == "withdrawn",
                                    "efficacy to learn the withdrawal")
        assert {v["week"]: v["status"] for v in view["visits"]} == {
            w: "done" if w == 0 else "cancelled" for w in visits}

        assert_problem(await assess(trial, site, patient_id, visits[4], 10.0), 409, "withdrawn")
        assert_problem(await site.post(
            f"/v1/patients/{patient_id}/assessments/{week0['assessment_id']}/corrections",
            json={"reason": "transcription error", "pasi": {"total": 16.0}}), 409, "withdrawn")
        assert [a["week"] for a in (await efficacy_of(site, patient_id))["assessments"]] == [0]


async def test_a_correction_changes_the_trajectory_and_a_week_is_assessed_once(
        trial: Trial) -> None:
    trial.back_to_today()
    async with client(trial.system) as site, client(trial.system, "investigator") as pi:
        patient_id, _ = await new_patient(site)
        visits = assessment_visits(await schedule_of(site, patient_id))
        week0 = ok(await assess(trial, site, patient_id, visits[0], 20.0), 201)
        week4 = ok(await assess(trial, site, patient_id, visits[4], 10.0), 201)
        assert (week4["pasi_percent_improvement"], week4["pasi50"], week4["pasi75"]) \
            == (50.0, True, False)

        again = assert_problem(await site.post(
            f"/v1/patients/{patient_id}/assessments",
            json=assessment(4, local(visits[4]["due_date"], 10), 8.0)), 409, "already_assessed")
        assert again["assessment_id"] == week4["assessment_id"]
        assert_problem(await site.post(
            f"/v1/patients/{patient_id}/assessments",
            json=assessment(5, local(visits[4]["due_date"], 10), 8.0)), 422,
            "not_an_assessment_week")
        path = f"/v1/patients/{patient_id}/assessments/{week0['assessment_id']}/corrections"
        assert_problem(await pi.post(path, json={"pasi": {"total": 40.0}}), 422,
                       "validation_error")  # no reason

        # The baseline was 40, not 20: week 4's 10 is a 75 % improvement.
        corrected = ok(await pi.post(path, json={"reason": "baseline transcribed from the "
                                                           "wrong page", "pasi": {"total": 40.0}}),
                       201)
        assert corrected["changed"] == ["pasi_total"] and corrected["corrections"] == 1
        assert corrected["pasi_total"] == 40.0
        view = await efficacy_of(site, patient_id)
        assert view["baseline"]["pasi"] == 40.0
        by_week = {a["week"]: a for a in view["assessments"]}
        assert (by_week[4]["baseline_pasi"], by_week[4]["pasi_percent_improvement"]) == (40.0, 75.0)
        assert (by_week[4]["pasi75"], by_week[4]["pasi90"]) == (True, False)
        assert by_week[4]["assessment_id"] == week4["assessment_id"]  # the same assessment

        # And week 4 itself, corrected: 2 from 40 is 95 %.
        r = ok(await site.post(
            f"/v1/patients/{patient_id}/assessments/{week4['assessment_id']}/corrections",
            json={"reason": "area score misread", "pasi": {"total": 2.0}}), 201)
        assert (r["pasi_percent_improvement"], r["pasi90"]) == (95.0, True)
        assert len((await efficacy_of(site, patient_id))["assessments"]) == 2


async def test_worklists_by_site_and_a_visit_overdue_the_day_after_its_window(
        trial: Trial) -> None:
    trial.back_to_today()
    sys = trial.system
    async with client(sys, site="S1") as s1, client(sys, site="S2") as s2, \
            client(sys, "monitor") as monitor:
        p1, _ = await new_patient(s1, "S1")
        p2, _ = await new_patient(s2, "S2")
        visit = assessment_visits(await schedule_of(s1, p1))[0]
        visit2 = assessment_visits(await schedule_of(s2, p2))[0]

        async def listed() -> list[dict[str, Any]] | None:
            items = await every_item(s1, "/v1/patients", site="S1")
            return items if any(i["patient_id"] == p1 for i in items) else None

        mine = await eventually(listed, timeout=WAIT, what="S1's worklist to list the patient")
        assert {i["site_id"] for i in mine} == {"S1"} and p2 not in {i["patient_id"] for i in mine}
        assert_problem(await s1.get("/v1/patients", params={"site": "S2"}), 403, "forbidden")
        assert_problem(await s2.get("/v1/patients", params={"site": "S1"}), 403, "forbidden")
        assert_problem(await s2.get("/v1/visits", params={"site": "S1"}), 403, "forbidden")
        for params in ({}, {"site": "S2"}):
            theirs = await every_item(s2, "/v1/patients", **params)
            assert p2 in {i["patient_id"] for i in theirs}
            assert {i["site_id"] for i in theirs} == {"S2"}
            their_visits = await every_item(s2, "/v1/visits", **params)
            assert p2 in {i["patient_id"] for i in their_visits}
            assert p1 not in {i["patient_id"] for i in their_visits}
        for path in (f"/v1/patients/{p1}/efficacy", f"/v1/patients/{p1}/schedule"):
            # Not even its existence: a patient hidden from S2 reads as one not found, and a
            # service says "not found" only once it has caught up (D33), "not yet" (503
            # not_caught_up) until then, which a site retries.
            async def hidden(path: str = path) -> httpx.Response | None:
                r = await s2.get(path)
                return r if not_caught_up_or(r, 404) else None

            found = await eventually(hidden, timeout=WAIT, what=f"S2's answer for {path}")
            assert_problem(found, 404, "patient_not_found")
        for site_id, present, absent in (("S1", p1, p2), ("S2", p2, p1)):
            ids = {i["patient_id"] for i in await every_item(monitor, "/v1/patients",
                                                            site=site_id)}
            assert present in ids and absent not in ids
        everyone = {i["patient_id"] for i in await every_item(monitor, "/v1/patients")}
        assert {p1, p2} <= everyone

        key = (p1, 0, "assessment")
        # 23:30 at the site on window_end (15:30 UTC): still due, not overdue.
        trial.at(local(visit["window_end"], 23, 30))
        overdue = visit_keys(await every_item(s1, "/v1/visits", site="S1", status="overdue"))
        assert key not in overdue, overdue
        due = visit_keys(await every_item(s1, "/v1/visits", site="S1", status="due",
                                          **{"from": visit["due_date"], "to": visit["due_date"]}))
        assert due[key] == "due"

        # 00:30 at the site the day after (16:30 UTC of window_end): overdue (or, the sweep
        # having run, missed: the overdue filter takes in both).
        trial.at(local(day_after(visit["window_end"]), 0, 30))
        overdue = visit_keys(await every_item(s1, "/v1/visits", site="S1", status="overdue"))
        assert overdue.get(key) in ("overdue", "missed"), overdue
        assert all(p != p2 for p, _, _ in overdue)
        assert all(p != p1 for p, _, _ in visit_keys(
            await every_item(s2, "/v1/visits", status="overdue")))
        if visit2["window_end"] == visit["window_end"]:  # unless enrolled across midnight
            assert visit_keys(await every_item(monitor, "/v1/visits", site="S2",
                                               status="overdue")
                              ).get((p2, 0, "assessment")) in ("overdue", "missed")
        assert key in visit_keys(await every_item(monitor, "/v1/visits", site="S1",
                                                  status="overdue"))

        # Once efficacy's sweep records it missed, dosing learns it: `missed` lists it too.
        async def missed() -> bool:
            items = await every_item(s1, "/v1/visits", site="S1", status="missed")
            return visit_keys(items).get(key) == "missed"

        await eventually(missed, timeout=WAIT, what="the week-0 assessment recorded missed")
        assert visit_keys(await every_item(s1, "/v1/visits", site="S1", status="overdue")
                          )[key] == "missed"
        patient = next(i for i in await every_item(s1, "/v1/patients", site="S1")
                       if i["patient_id"] == p1)
        assert patient["visits_overdue"] >= 1


async def test_bug_week_0_assessment_before_the_first_dose_stays_done_on_the_schedule(
        trial: Trial) -> None:
    """Found by this file (fails at 396e308): dosing's evolve(DosingScheduleReanchored),
    services/dosing/domain.py, kept only 'given' and 'cancelled' through the re-dating, so an
    assessment visit efficacy had recorded done before the week-0 dose was planned again on
    dosing's schedule (efficacy kept it done), and the visits worklist chased it as overdue once
    its window closed (and the study's end would have cancelled it)."""
    trial.back_to_today()
    async with client(trial.system) as site:
        patient_id, _ = await new_patient(site)
        schedule = await schedule_of(site, patient_id)
        visit = assessment_visits(schedule)[0]
        first_dose = dose_visits(schedule)[0]
        # The baseline assessment at 09:00, the first dose at 11:00, the same day (day 0 = the
        # date already planned: no visit moves).
        ok(await assess(trial, site, patient_id, visit, 20.0, local(visit["due_date"], 9)), 201)
        await schedule_of(site, patient_id, until=lambda s: schedule_status(s, 0) == "done")
        trial.at(local(first_dose["due_date"], 11, 1))
        ok(await give_dose(site, patient_id, first_dose, local(first_dose["due_date"], 11)), 201)

        calendar = await schedule_of(site, patient_id, until=lambda s: s["day_zero_fixed"])
        view = await efficacy_of(site, patient_id)
        trial.at(local(day_after(visit["window_end"]), 0, 30))
        overdue = visit_keys(await every_item(site, "/v1/visits", site="S1", status="overdue"))
        found = {"efficacy": efficacy_visit(view, 0)["status"],
                 "dosing schedule": schedule_status(calendar, 0),
                 "overdue worklist": overdue.get((patient_id, 0, "assessment"))}
        assert found == {"efficacy": "done", "dosing schedule": "done",
                         "overdue worklist": None}, found
