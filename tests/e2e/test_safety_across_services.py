"""Safety holds across services on the real broker: an arm suspension and a trial halt, enforced by
dosing and randomization through the gateway, lifted only by a DSMB decision.

These tests run on a broker and system of their own: a suspended arm or a halted trial on the
shared broker would stop every other test's doses.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import client, screening, system_of_its_own
from tests.support import eventually
from tooling.launcher import System

CELLS_PER_KG = {"msc_low": 1_000_000, "msc_high": 3_000_000}


@pytest.fixture(scope="module")
def safety_system(pg_dsn: str | None, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[System]:
    with system_of_its_own(pg_dsn, tmp_path_factory.mktemp("safety")) as system:
        yield system


def now() -> str:
    return datetime.now(UTC).isoformat()


async def enrol(site: httpx.AsyncClient) -> str:
    r = await site.post("/v1/screenings", json=screening())
    assert r.status_code == 201 and r.json()["eligible"], r.text
    r = await site.post("/v1/patients", json={"screening_id": r.json()["screening_id"]})
    assert r.status_code == 201, r.text
    patient_id: str = r.json()["patient_id"]
    return patient_id


async def randomized_patients(site: httpx.AsyncClient, wanted: dict[str, int]
                              ) -> dict[str, list[str]]:
    """Enrol and randomize until each arm has its wanted number of patients."""
    by_arm: dict[str, list[str]] = {"msc_low": [], "msc_high": [], "mtx": []}
    for _ in range(30):
        if all(len(by_arm[a]) >= n for a, n in wanted.items()):
            return by_arm
        patient = await enrol(site)
        r = await site.post(f"/v1/patients/{patient}/randomization")
        assert r.status_code == 201, r.text
        by_arm[r.json()["arm"]].append(patient)
    raise AssertionError(f"allocation never gave {wanted}: {by_arm}")


async def dose(site: httpx.AsyncClient, patient: str, arm: str) -> httpx.Response:
    if arm == "mtx":
        return await site.post(f"/v1/patients/{patient}/methotrexate-doses",
                               json={"week": 0, "dose_mg": 7.5, "given_at": now()})
    return await site.post(f"/v1/patients/{patient}/infusions", json={
        "week": 0, "given_at": now(), "weight_kg": 70.0,
        "cells_administered": CELLS_PER_KG[arm] * 70, "lot_number": "L-1",
        "deviation_reason": None})


async def scheduled(site: httpx.AsyncClient, patients: list[str]) -> None:
    """Dosing builds each calendar from trial.enrollment: wait until it has them."""
    for patient in patients:
        async def has_calendar(p: str = patient) -> bool:
            return (await site.get(f"/v1/patients/{p}/schedule")).status_code == 200

        await eventually(has_calendar, timeout=120, what=f"a calendar for {patient}")


async def ready_for_safety(site: httpx.AsyncClient, patients: list[str]) -> None:
    """Safety learns of patients from trial.enrollment: wait until it knows every one (a lab
    result nothing fires on is the observable; it writes only what it reports)."""
    for patient in patients:
        async def known(p: str = patient) -> bool:
            r = await site.post(f"/v1/patients/{p}/lab-results", json={
                "collected_at": now(),
                "results": [{"analyte": "WBC", "value": 6.0, "unit": "10^9/L"}]})
            return r.status_code == 201

        await eventually(known, timeout=120, what=f"safety to know {patient}")


async def ledger(monitor: httpx.AsyncClient, event_type: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"type": event_type, "limit": 1000}
        if cursor:
            params["cursor"] = cursor
        page = (await monitor.get("/v1/audit/events", params=params)).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items


async def wait_in_ledger(monitor: httpx.AsyncClient, event_type: str, hold_ids: set[str]) -> None:
    """A service's reaction is in the ledger only after that service committed it."""
    async def landed() -> bool:
        seen = {i["data"].get("hold_id") for i in await ledger(monitor, event_type)}
        return hold_ids <= seen

    await eventually(landed, timeout=120, what=f"{event_type} for {sorted(hold_ids)}")


async def test_a_related_grade_4_in_msc_high_suspends_the_arm_until_the_dsmb_resumes_it(
        safety_system: System) -> None:
    async with client(safety_system) as site, client(safety_system, "monitor") as monitor, \
            client(safety_system, "dsmb") as dsmb:
        arms = await randomized_patients(site, {"msc_high": 2, "msc_low": 1, "mtx": 1})
        high, other_high = arms["msc_high"][0], arms["msc_high"][1]
        await ready_for_safety(site, [high])
        await scheduled(site, [high, other_high, arms["msc_low"][0], arms["mtx"][0]])
        r = await site.post(f"/v1/patients/{high}/adverse-events", json={
            "term": "anaphylaxis", "onset_at": now(), "ctcae_grade": 4, "serious": True,
            "relatedness": "probable", "expected": True, "infusion_related": False})
        assert r.status_code == 201, r.text
        assert "R2-related-grade4" in r.json()["triggered_rules"]
        ae_id = r.json()["adverse_event_id"]
        # a follow-up through the gateway appends; the same evidence fires nothing again
        up = await site.post(f"/v1/patients/{high}/adverse-events/{ae_id}/follow-ups",
                             json={"outcome": "recovering"})
        assert up.status_code == 201 and up.json()["triggered_rules"] == [], up.text
        status = (await monitor.get("/v1/safety/status")).json()
        assert status["arms"]["msc_high"]["status"] == "suspended"
        assert {a: status["arms"][a]["status"] for a in ("msc_low", "mtx")} == {
            "msc_low": "active", "mtx": "active"}
        holds = {h["hold_id"] for h in status["arms"]["msc_high"]["holds"]}
        await wait_in_ledger(monitor, "DosingHeld", holds)
        await wait_in_ledger(monitor, "RandomizationHoldApplied", holds)

        # dosing: every msc_high patient is refused, naming the rule; other arms dose
        for patient in (other_high, high):
            refused = await dose(site, patient, "msc_high")
            assert refused.status_code == 409, refused.text
            assert refused.json()["code"] == "dosing_held"
            assert refused.json()["rule_id"] == "R2-related-grade4"
        assert (await dose(site, arms["msc_low"][0], "msc_low")).status_code == 201
        assert (await dose(site, arms["mtx"][0], "mtx")).status_code == 201

        # randomization goes on among the open arms, refusing no one (D30)
        for _ in range(6):
            r = await site.post(f"/v1/patients/{await enrol(site)}/randomization")
            assert r.status_code == 201 and r.json()["arm"] != "msc_high", r.text

        # the DSMB resumes the arm: both succeed again
        decision = await dsmb.post("/v1/safety/decisions", json={
            "scope": "arm", "target": "msc_high", "decision": "resume",
            "rationale": "Case reviewed by the DSMB: the arm may resume with monitoring."})
        assert decision.status_code == 201, decision.text
        assert {x["hold_id"] for x in decision.json()["lifted"]} == holds
        await wait_in_ledger(monitor, "DosingResumed", holds)
        await wait_in_ledger(monitor, "RandomizationHoldLifted", holds)
        given = await dose(site, other_high, "msc_high")
        assert given.status_code == 201, given.text
        arms_after: list[str] = []
        while "msc_high" not in arms_after and len(arms_after) < 12:  # any 12 slots hold a block
            r = await site.post(f"/v1/patients/{await enrol(site)}/randomization")
            assert r.status_code == 201, r.text
            arms_after.append(r.json()["arm"])
        assert "msc_high" in arms_after  # its slots are drawn again
        after = (await monitor.get("/v1/safety/status")).json()
        assert after["arms"]["msc_high"]["status"] == "active"


async def test_a_death_halts_enrolment_and_all_dosing_and_only_the_dsmb_lifts_it(
        safety_system: System) -> None:
    async with client(safety_system) as site, client(safety_system, "monitor") as monitor, \
            client(safety_system, "investigator") as investigator, \
            client(safety_system, "dsmb") as dsmb:
        arms = await randomized_patients(site, {"msc_high": 1, "msc_low": 1, "mtx": 1})
        patients = {arm: ids[-1] for arm, ids in arms.items()}
        await ready_for_safety(site, [patients["mtx"]])
        await scheduled(site, list(patients.values()))
        r = await site.post(f"/v1/patients/{patients['mtx']}/adverse-events", json={
            "term": "sudden death", "onset_at": now(), "ctcae_grade": 5, "serious": True,
            "relatedness": "not_related", "expected": True, "infusion_related": False})
        assert r.status_code == 201 and r.json()["triggered_rules"] == ["R1-death"], r.text
        status = (await monitor.get("/v1/safety/status")).json()
        assert status["trial"]["status"] == "halted" and status["trial"]["enrollment"] == "paused"
        (hold,) = [h["hold_id"] for h in status["trial"]["holds"]]
        await wait_in_ledger(monitor, "DosingHeld", {hold})
        await wait_in_ledger(monitor, "RandomizationHoldApplied", {hold})

        # The patient who died: their study has ended (efficacy's DeathRecorded, D37), before
        # and after the DSMB lifts the halt; everyone else: held by the halt until it lifts.
        dead = patients.pop("mtx")

        async def study_ended() -> bool:
            refused = await dose(site, dead, "mtx")
            return (refused.status_code, refused.json()["code"]) == (409, "study_ended")

        await eventually(study_ended, what="dosing to learn of the death from trial.efficacy")
        for arm, patient in patients.items():
            refused = await dose(site, patient, arm)
            assert (refused.status_code, refused.json()["code"]) == (409, "dosing_held"), arm
            assert refused.json()["rule_id"] == "R1-death"
        newcomer = await enrol(site)
        r = await site.post(f"/v1/patients/{newcomer}/randomization")
        assert (r.status_code, r.json()["code"]) == (409, "trial_halted"), r.text

        resume = {"scope": "trial", "target": "NCT03424629", "decision": "resume",
                  "rationale": "Death unrelated to study treatment (autopsy report reviewed)."}
        for who in (site, monitor, investigator):
            refused = await who.post("/v1/safety/decisions", json=resume)
            assert (refused.status_code, refused.json()["code"]) == (403, "forbidden")
        assert (await monitor.get("/v1/safety/status")).json()["trial"]["status"] == "halted"
        lifted = await dsmb.post("/v1/safety/decisions", json=resume)
        assert lifted.status_code == 201, lifted.text
        assert [x["hold_id"] for x in lifted.json()["lifted"]] == [hold]
        await wait_in_ledger(monitor, "DosingResumed", {hold})
        await wait_in_ledger(monitor, "RandomizationHoldLifted", {hold})
        for arm, patient in patients.items():
            given = await dose(site, patient, arm)
            assert given.status_code == 201, (arm, given.text)
        assert (await dose(site, dead, "mtx")).json()["code"] == "study_ended"
        r = await site.post(f"/v1/patients/{newcomer}/randomization")
        assert r.status_code == 201, r.text
        assert (await monitor.get("/v1/safety/status")).json()["trial"]["status"] == "active"

