"""Patients for the dosing tests, enrolled and randomized through the gateway; the calendar read
back through the gateway with the permission matrix applied."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx

from tests.e2e.conftest import client, screening
from tests.support import eventually
from tooling.launcher import System

CELLS_PER_KG = {"msc_low": 1_000_000, "msc_high": 3_000_000}
INFUSION_ARMS = frozenset(CELLS_PER_KG)
ANY_ARM = frozenset({"msc_low", "msc_high", "mtx"})
# Randomized patients not yet used by any test, by (gateway, site): allocation decides the arm,
# so a test that needs one arm keeps the others for the next test instead of enrolling anew.
_spare: dict[tuple[str, str], list[tuple[str, str]]] = {}


async def randomized_patient(site: httpx.AsyncClient, arms: frozenset[str] = ANY_ARM,
                             site_id: str = "S1") -> tuple[str, str]:
    """(patient id, arm) of a fresh patient in one of `arms`, enrolling until allocation gives one."""
    pool = _spare.setdefault((str(site.base_url), site_id), [])
    for patient in pool:
        if patient[1] in arms:
            pool.remove(patient)
            return patient
    for _ in range(12):
        r = await site.post("/v1/screenings", json=screening(site=site_id))
        assert r.status_code == 201 and r.json()["eligible"], r.text
        r = await site.post("/v1/patients", json={"screening_id": r.json()["screening_id"]})
        assert r.status_code == 201, r.text
        patient_id = r.json()["patient_id"]
        r = await site.post(f"/v1/patients/{patient_id}/randomization")
        assert r.status_code == 201, r.text
        if r.json()["arm"] in arms:
            return patient_id, r.json()["arm"]
        pool.append((patient_id, r.json()["arm"]))
    raise AssertionError(f"allocation gave none of {sorted(arms)} in 12 patients")


async def schedule_of(site: httpx.AsyncClient, patient_id: str,
                      until: Any = None) -> dict[str, Any]:
    """The patient's calendar once dosing has it (and `until(schedule)` holds, if given)."""
    async def ready() -> dict[str, Any] | None:
        r = await site.get(f"/v1/patients/{patient_id}/schedule")
        if r.status_code != 200:
            return None
        body: dict[str, Any] = r.json()
        return body if until is None or until(body) else None

    found: dict[str, Any] = await eventually(ready, timeout=120, what=f"{patient_id}'s schedule")
    return found


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def dose_body(arm: str, week: int = 0, **overrides: Any) -> dict[str, Any]:
    if arm in CELLS_PER_KG:
        body: dict[str, Any] = {"week": week, "given_at": now_iso(), "weight_kg": 70.0,
                                "cells_administered": CELLS_PER_KG[arm] * 70,
                                "lot_number": "L-E2E-1", "deviation_reason": None}
    else:
        body = {"week": week, "dose_mg": 7.5, "given_at": now_iso()}
    return {**body, **overrides}


def dose_path(patient_id: str, arm: str) -> str:
    kind = "infusions" if arm in CELLS_PER_KG else "methotrexate-doses"
    return f"/v1/patients/{patient_id}/{kind}"


async def give(site: httpx.AsyncClient, patient_id: str, arm: str, week: int = 0,
               **overrides: Any) -> httpx.Response:
    return await site.post(dose_path(patient_id, arm), json=dose_body(arm, week, **overrides))


async def test_the_schedule_through_the_gateway_follows_the_permission_matrix(
        system: System) -> None:
    async with client(system) as site, client(system, "pharmacist") as pharmacist, \
            client(system, "monitor") as monitor, client(system, site="S2") as other_site:
        patient_id, arm = await randomized_patient(site)
        calendar = await schedule_of(site, patient_id)
        assert calendar["arm"] == arm and calendar["patient_id"] == patient_id
        assert calendar["day_zero_fixed"] is False and calendar["withdrawn"] is False
        kinds = {v["kind"] for v in calendar["visits"]}
        assert kinds == {"assessment", "infusion" if arm in INFUSION_ARMS else "methotrexate"}
        assert max(v["week"] for v in calendar["visits"]) == 52
        assert all(v["status"] == "planned" for v in calendar["visits"])
        for reader in (pharmacist, monitor):
            r = await reader.get(f"/v1/patients/{patient_id}/schedule")
            assert r.status_code == 200 and r.json()["visits"] == calendar["visits"]
        for path in (f"/v1/patients/{patient_id}/schedule", "/v1/patients/PT-NOBODY/schedule"):
            r = await other_site.get(path)  # another site's patient and no patient look alike
            assert (r.status_code, r.json()["code"]) == (404, "patient_not_found")
            assert r.headers["content-type"] == "application/problem+json"
