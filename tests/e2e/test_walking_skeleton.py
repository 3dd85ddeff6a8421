"""The thinnest real slice: screen, enrol, randomize through the gateway; dosing and audit follow."""

from __future__ import annotations

import uuid

import httpx

from tests.e2e.conftest import client, screening
from tests.support import eventually
from tooling.launcher import System


async def test_screen_enrol_randomize_schedule_and_audit(system: System) -> None:
    async with client(system) as site, client(system, "monitor") as monitor:
        r = await site.post("/v1/screenings", json=screening(), headers={"X-Request-ID": "req-e2e-1"})
        assert r.status_code == 201, r.text
        assert r.headers["x-request-id"] == "req-e2e-1"
        screened = r.json()
        assert screened["eligible"] is True and screened["reasons"] == []

        r = await site.post("/v1/patients", json={"screening_id": screened["screening_id"]})
        assert r.status_code == 201, r.text
        patient_id = r.json()["patient_id"]
        assert r.json() == {"patient_id": patient_id, "site_id": "S1", "status": "enrolled"}

        r = await site.post(f"/v1/patients/{patient_id}/randomization")
        assert r.status_code == 201, r.text
        assigned = r.json()
        assert assigned["arm"] in ("msc_low", "msc_high", "mtx")
        assert assigned["stratum"] == "S1:pasi_lt20"
        again = await site.post(f"/v1/patients/{patient_id}/randomization")
        assert again.status_code == 200 and again.json() == assigned

        async def schedule() -> httpx.Response | None:
            resp = await site.get(f"/v1/patients/{patient_id}/schedule")
            return resp if resp.status_code == 200 else None

        sched = (await eventually(schedule, what="dosing to build the calendar")).json()
        assert sched["arm"] == assigned["arm"]
        kinds = {v["kind"] for v in sched["visits"]}
        assert "assessment" in kinds and len(kinds) == 2
        assert all(v["status"] == "planned" for v in sched["visits"])

        # The ledger files every event naming the patient under it, whatever its subject
        # (AllocationSlotUsed is keyed by its stratum).
        expected = {"PatientEnrolled", "AllocationSlotUsed", "ArmAssigned", "DosingScheduleCreated"}

        async def ledger() -> list[dict[str, object]] | None:
            resp = await monitor.get("/v1/audit/events", params={"patient_id": patient_id})
            items = resp.json()["items"]
            return items if expected <= {i["type"] for i in items} else None

        items = await eventually(ledger, what="the ledger to hold the patient's events")
        by_type = {i["type"]: i for i in items}
        assert sum(i["type"] in expected for i in items) == 4
        # Safety's own record of the facts its rules need names the patient too (D16), and so
        # does efficacy's of what it learnt for the follow-up (D37); and the monitor's own
        # queries of the patient before this one, which are reads of it (D50).
        assert set(by_type) - expected <= {"PatientSafetyFactRecorded", "FollowUpFactRecorded",
                                           "PatientDataViewed"}
        assert {(i["actor"]["role"], i["data"]["route"]) for i in items
                if i["type"] == "PatientDataViewed"} <= {("monitor", "/v1/audit/events")}
        # Across topics and keys the ledger keeps arrival order; within one source's topic and
        # key (one partition), the source's order.
        randomization = [i["type"] for i in items if i["source"] == "/services/randomization"
                         and i["subject"] == patient_id]
        assert randomization == ["PatientEnrolled", "ArmAssigned"]
        assert by_type["PatientEnrolled"]["actor"]["role"] == "site_coordinator"
        assert by_type["DosingScheduleCreated"]["source"] == "/services/dosing"
        assert by_type["DosingScheduleCreated"]["data"]["arm"] == assigned["arm"]
        screened_entries = (await monitor.get(
            "/v1/audit/events", params={"type": "PatientScreened"})).json()["items"]
        ours = [e for e in screened_entries if e["subject"] == screened["screening_id"]]
        assert len(ours) == 1 and ours[0]["correlation_id"] == "req-e2e-1"
        verify = (await monitor.get("/v1/audit/verify")).json()
        assert verify["ok"] is True and verify["events_checked"] >= 4


async def test_bad_input_is_a_clear_4xx_and_writes_nothing(system: System) -> None:
    async with client(system) as site, client(system, "monitor") as monitor:
        request_id = f"bad-input-{uuid.uuid4().hex[:8]}"
        site.headers["X-Request-ID"] = request_id  # so the ledger shows what these requests did
        cases = [
            (await site.post("/v1/screenings", content=b"{not json",
                             headers={"content-type": "application/json"}), 400, "malformed_json"),
            (await site.post("/v1/screenings", json=screening(pasi="lots")), 422, "validation_error"),
            (await site.post("/v1/screenings", json={**screening(), "name": "Jane Doe"}), 422,
             "validation_error"),
            (await site.post("/v1/patients", json={}), 422, "validation_error"),
            (await site.post("/v1/patients", json={"screening_id": "nope"}), 404,
             "screening_not_found"),
            (await site.post("/v1/patients/PT-NOPE/randomization"), 404, "patient_not_found"),
            (await site.post("/v1/screenings", json=screening(site="S2")), 403, "forbidden"),
            (await site.get("/v1/nothing-here"), 404, "not_found"),
        ]
        for response, status, code in cases:
            assert response.status_code == status, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["code"] == code
            assert "Traceback" not in response.text
        errors = cases[1][0].json()["errors"]
        assert errors[0]["field"] == "body.pasi"
        # An ineligible screening is still recorded, with its reasons.
        r = await site.post("/v1/screenings", json=screening(pasi=5.0, bsa_percent=5.0))
        assert r.status_code == 201 and r.json()["eligible"] is False
        assert {x["criterion"] for x in r.json()["reasons"]} == {"INC-SEVERITY"}
        r = await site.post("/v1/patients", json={"screening_id": r.json()["screening_id"]})
        assert (r.status_code, r.json()["code"]) == (422, "not_eligible")

        async def only_the_ineligible_screening_landed() -> bool:
            items = (await monitor.get("/v1/audit/events", params={
                "correlation_id": request_id, "limit": 1000})).json()["items"]
            # Besides it, the three refused writes (two 404s, one 403) are kept as AccessDenied.
            return sorted(i["type"] for i in items) == ["AccessDenied"] * 3 + ["PatientScreened"]

        await eventually(only_the_ineligible_screening_landed, what="the ledger to settle")


async def test_tokens_are_required_at_the_gateway_and_at_each_service(system: System) -> None:
    async with httpx.AsyncClient(base_url=system.url(), timeout=30) as anonymous:
        r = await anonymous.post("/v1/screenings", json=screening())
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        r = await anonymous.get("/v1/audit/events",
                                headers={"Authorization": "Bearer not.a.token"})
        assert r.status_code == 401
    for service in ("randomization", "dosing", "safety", "audit"):
        async with httpx.AsyncClient(base_url=system.url(service), timeout=30) as direct:
            assert (await direct.get("/healthz")).status_code == 200
            r = await direct.get("/v1/safety/status" if service == "safety"
                                 else "/v1/audit/events" if service == "audit"
                                 else "/v1/patients/PT-X/schedule" if service == "dosing"
                                 else "/v1/patients/PT-X")
            assert r.status_code == 401, (service, r.text)
