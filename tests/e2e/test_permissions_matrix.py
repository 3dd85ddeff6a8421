"""The permission matrix, generated: every public route x every role x own and other site, through
the gateway and straight at the owning service, against the status the matrix says."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest

from services.gateway.routes import ROUTES, Route
from shared.auth import ROLES, SITE_ROLES
from shared.permissions import MATRIX
from tests.e2e.conftest import screening, token
from tests.support import eventually
from tooling.launcher import System

OWN, OTHER = "S1", "S2"
AUTHORIZED = frozenset({*range(200, 300), 409, 422})  # past the permission check: a domain answer


@dataclass(frozen=True)
class Case:
    """How to call one route for real: a body, and which answers mean "allowed"."""

    body: Callable[[Fixtures], Awaitable[dict[str, object] | None]]
    ok: frozenset[int]
    fresh_patient: bool = False  # the allowed call changes the patient: give each its own
    site_in_body: bool = False   # a new record at the site the caller names (403 elsewhere)


class Fixtures:
    """Patients and screenings at site S1, made through the gateway as the tests need them."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.site = _client(system, "site_coordinator", OWN)
        self.monitor = _client(system, "monitor", None)
        self._shared: str | None = None
        self._adverse_event: str | None = None

    async def eligible_screening(self) -> str:
        r = await self.site.post("/v1/screenings", json=screening(OWN))
        assert r.status_code == 201, r.text
        return str(r.json()["screening_id"])

    async def enrolled_patient(self) -> str:
        r = await self.site.post("/v1/patients",
                                 json={"screening_id": await self.eligible_screening()})
        assert r.status_code == 201, r.text
        return str(r.json()["patient_id"])

    async def randomized_patient(self) -> str:
        patient = await self.enrolled_patient()
        r = await self.site.post(f"/v1/patients/{patient}/randomization")
        assert r.status_code in (200, 201), r.text
        return patient

    async def shared_patient(self) -> str:
        """One randomized patient whose calendar and ledger entries exist (read-only routes)."""
        if self._shared is None:
            patient = await self.randomized_patient()

            async def ready() -> bool:
                schedule = await self.site.get(f"/v1/patients/{patient}/schedule")
                ledger = await self.monitor.get(f"/v1/audit/patients/{patient}/history")
                efficacy = await self.site.get(f"/v1/patients/{patient}/efficacy")
                # An empty follow-up of no adverse event: refused for the event, not the patient,
                # once safety has heard of the patient.
                probe = await self.site.post(f"/v1/patients/{patient}/adverse-events/AE-NONE/"
                                             "follow-ups", json={})
                return (schedule.status_code == 200 and ledger.status_code == 200
                        and efficacy.status_code == 200
                        and probe.json().get("code") != "patient_not_found")

            await eventually(ready, 120, "every service to know the shared patient")
            self._shared = patient
        return self._shared

    async def adverse_event(self) -> str:
        if self._adverse_event is None:
            r = await self.site.post(f"/v1/patients/{await self.shared_patient()}/adverse-events",
                                     json=ADVERSE_EVENT)
            if r.json().get("code") == "not_found":  # not built yet: the gateway's checks remain
                return "AE-NONE"
            assert r.status_code == 201, r.text
            self._adverse_event = str(r.json()["adverse_event_id"])
        return self._adverse_event

    async def close(self) -> None:
        await self.site.aclose()
        await self.monitor.aclose()


async def _none(_: Fixtures) -> None:
    return None


async def _screening_body(_: Fixtures) -> dict[str, object]:
    return screening(OWN)


async def _enrol_body(f: Fixtures) -> dict[str, object]:
    return {"screening_id": await f.eligible_screening()}


def _fixed(body: dict[str, object]) -> Callable[[Fixtures], Awaitable[dict[str, object]]]:
    async def make(_: Fixtures) -> dict[str, object]:
        return body
    return make


NOW = "2026-11-26T09:00:00Z"
# Benign on purpose: the session's system is shared, and no stopping rule may fire here.
ADVERSE_EVENT = {"term": "headache", "onset_at": NOW, "ctcae_grade": 1, "serious": False,
                 "relatedness": "unlikely", "expected": True, "infusion_related": None}
CASES: dict[tuple[str, str], Case] = {
    ("POST", "/v1/screenings"): Case(_screening_body, frozenset({201}), site_in_body=True),
    ("POST", "/v1/patients"): Case(_enrol_body, frozenset({201}), site_in_body=True),
    ("GET", "/v1/patients/{patient_id}"): Case(_none, frozenset({200})),
    ("POST", "/v1/patients/{patient_id}/randomization"): Case(_none, frozenset({200, 201})),
    ("POST", "/v1/patients/{patient_id}/withdrawal"): Case(
        _fixed({"reason": "moved to another city"}), frozenset({200}), fresh_patient=True),
    ("POST", "/v1/patients/{patient_id}/crossover"): Case(
        _fixed({"to_arm": "mtx", "reason": "lack of efficacy at week 16"}), AUTHORIZED,
        fresh_patient=True),
    ("GET", "/v1/patients/{patient_id}/schedule"): Case(_none, frozenset({200})),
    ("POST", "/v1/patients/{patient_id}/infusions"): Case(_fixed(
        {"week": 0, "given_at": NOW, "weight_kg": 70.0, "cells_administered": 70_000_000,
         "lot_number": "L-1", "deviation_reason": None}), AUTHORIZED),
    ("POST", "/v1/patients/{patient_id}/methotrexate-doses"): Case(_fixed(
        {"week": 0, "dose_mg": 7.5, "given_at": NOW}), AUTHORIZED),
    ("POST", "/v1/patients/{patient_id}/adverse-events"): Case(
        _fixed(ADVERSE_EVENT), frozenset({201})),
    ("POST", "/v1/patients/{patient_id}/adverse-events/{adverse_event_id}/follow-ups"): Case(
        _fixed({"ctcae_grade": 1}), AUTHORIZED),
    ("POST", "/v1/patients/{patient_id}/lab-results"): Case(_fixed(
        {"collected_at": NOW, "results": [
            {"analyte": "ALT", "value": 30.0, "unit": "U/L", "uln": 40.0}]}), frozenset({201})),
    ("GET", "/v1/safety/status"): Case(_none, frozenset({200})),
    ("POST", "/v1/safety/decisions"): Case(_fixed(
        {"scope": "trial", "target": "NCT03424629", "decision": "resume",
         "rationale": "no hold to lift: checks only the permission"}), AUTHORIZED | {404}),
    ("POST", "/v1/patients/{patient_id}/assessments"): Case(_fixed(
        {"week": 0, "assessed_at": NOW, "pasi": {"total": 12.0}, "spga": 3}), AUTHORIZED),
    ("POST", "/v1/patients/{patient_id}/assessments/{assessment_id}/corrections"): Case(
        _fixed({"reason": "transcription error", "spga": 2}), AUTHORIZED | {404}),
    ("POST", "/v1/patients/{patient_id}/treatment-discontinuation"): Case(
        _fixed({"reason": "intolerance"}), frozenset({200}), fresh_patient=True),
    ("POST", "/v1/patients/{patient_id}/lost-to-follow-up"): Case(
        _fixed({"reason": "no answer to calls or letters"}), frozenset({200}),
        fresh_patient=True),
    ("GET", "/v1/patients/{patient_id}/efficacy"): Case(_none, frozenset({200})),
    ("GET", "/v1/efficacy/summary"): Case(_none, frozenset({200})),
    ("GET", "/v1/patients"): Case(_none, frozenset({200})),
    ("GET", "/v1/visits"): Case(_none, frozenset({200})),
    ("GET", "/v1/reports/dsmb"): Case(_none, frozenset({200})),
    ("GET", "/v1/exports/sdtm"): Case(_none, frozenset({200})),
    ("GET", "/v1/exports/sdtm/{domain}"): Case(_none, frozenset({200})),
    ("GET", "/v1/fhir/ResearchStudy/{study_id}"): Case(_none, frozenset({200})),
    ("GET", "/v1/fhir/ResearchSubject"): Case(_none, frozenset({200})),
    ("GET", "/v1/fhir/AdverseEvent"): Case(_none, frozenset({200})),
    ("GET", "/v1/audit/events"): Case(_none, frozenset({200})),
    ("GET", "/v1/audit/verify"): Case(_none, frozenset({200})),
    ("GET", "/v1/audit/export"): Case(_none, frozenset({200})),
    ("GET", "/v1/audit/patients/{patient_id}/history"): Case(_none, frozenset({200})),
}


def test_every_public_route_has_a_case() -> None:
    assert {(r.method, r.template) for r in ROUTES} == set(CASES)


def _client(system: System, role: str | None, site: str | None,
            service: str = "gateway") -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token(role, site)}"} if role else {}
    return httpx.AsyncClient(base_url=system.url(service), timeout=60, headers=headers)


def principals() -> list[tuple[str | None, str | None]]:
    """(role, site): no token at all, each site role at the patient's site and at another, and
    each trial-wide role (which has no site)."""
    found: list[tuple[str | None, str | None]] = [(None, None)]
    for role in ROLES:
        found += [(role, OWN), (role, OTHER)] if role in SITE_ROLES else [(role, None)]
    return found


def expected(route: Route, role: str | None, site: str | None, via: str,
             case: Case) -> frozenset[int]:
    """What the matrix says: 401 without a token; 404 for another site's patient (before the
    role check at the service; the gateway refuses by role first, which leaks nothing, since it
    has not looked at the patient); 403 for a role the action is not open to or a new record at
    another site; otherwise the route's own answer."""
    if role is None:
        return frozenset({401})
    allowed = role in MATRIX[route.action]
    other_site = role in SITE_ROLES and site != OWN
    patient_scoped = "{patient_id}" in route.template and not route.template.startswith("/v1/audit")
    if via == "gateway" and not allowed:
        return frozenset({403})
    if patient_scoped and other_site:
        return frozenset({404})
    if case.site_in_body and other_site:
        return frozenset({403, 404})  # another site's screening may be hidden or refused
    if not allowed:
        return frozenset({403})
    return case.ok


async def _implemented(system: System, route: Route) -> bool:
    async with httpx.AsyncClient(base_url=system.url(route.service), timeout=60) as direct:
        paths = (await direct.get("/openapi.json")).json()["paths"]
    return route.method.lower() in paths.get(route.template, {})


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.template}")
async def test_route_answers_every_role_and_site_as_the_matrix_says(system: System,
                                                                    route: Route) -> None:
    case = CASES[(route.method, route.template)]
    fixtures = Fixtures(system)
    mismatches: list[str] = []
    checked = 0
    try:
        implemented = await _implemented(system, route)
        for via in ("gateway", route.service):
            for role, site in principals():
                want = expected(route, role, site, via, case)
                # A route whose service has not built it yet is still checked wherever the
                # answer does not depend on the service: no token, and the gateway's refusals.
                if not implemented and not (role is None and via == "gateway") and not (
                        via == "gateway" and want == {403}):
                    continue
                allowed_here = want == case.ok
                patient = (await fixtures.randomized_patient() if allowed_here and case.fresh_patient
                           else await fixtures.shared_patient())
                adverse_event = (await fixtures.adverse_event()
                                 if "{adverse_event_id}" in route.template else "")
                path = route.template.format(patient_id=patient, adverse_event_id=adverse_event,
                                             assessment_id="AS-NONE", study_id="NCT03424629",
                                             domain="AE")
                body = await case.body(fixtures) if route.method == "POST" else None
                async with _client(system, role, site, via) as caller:
                    r = await caller.request(route.method, path, json=body)
                checked += 1
                if r.status_code not in want:
                    mismatches.append(f"{via} {role}@{site}: {r.status_code} not in "
                                      f"{sorted(want)}: {r.text[:200]}")
                elif r.status_code >= 400:
                    assert r.headers["content-type"] == "application/problem+json"
    finally:
        await fixtures.close()
    assert checked >= 2
    assert not mismatches, "\n".join(mismatches)
