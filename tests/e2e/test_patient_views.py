"""A monitor's or the DSMB's read of a patient's data is an audit entry (D50, 21 CFR 11): the
audit trail says who saw what; a site's own reads and reads answered with an error are not."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from tests.e2e.conftest import client
from tests.e2e.test_efficacy import new_patient
from tests.support import eventually
from tooling.launcher import System


async def test_monitor_and_dsmb_reads_of_a_patient_are_in_the_audit_trail(system: System) -> None:
    async with client(system) as site, client(system, "monitor", None) as monitor, \
            client(system, "dsmb", None) as dsmb:
        patient, _ = await new_patient(site)
        assert (await site.get(f"/v1/patients/{patient}")).status_code == 200  # the site's own
        assert (await monitor.get(f"/v1/patients/{patient}")).status_code == 200
        assert (await monitor.get(f"/v1/patients/{patient}/schedule")).status_code == 200
        assert (await monitor.get("/v1/patients/no-such-patient")).status_code == 404

        async def views() -> list[dict[str, Any]]:
            answer = await dsmb.get("/v1/audit/events", params={
                "type": "PatientDataViewed", "patient_id": patient})
            assert answer.status_code == 200, answer.text
            return list(answer.json()["items"])

        everyone = await _until(views, lambda items: sum(
            e["actor"]["role"] == "monitor" for e in items) >= 2)
        found = [e for e in everyone if e["actor"]["role"] == "monitor"]
        assert sorted(e["data"]["route"] for e in found) == [
            "/v1/patients/{patient_id}", "/v1/patients/{patient_id}/schedule"]
        assert {(e["actor"]["role"], e["source"]) for e in found} == {
            ("monitor", "/services/randomization"), ("monitor", "/services/dosing")}
        # The DSMB's own queries narrowed to the patient are reads of it too (filed by the
        # ledger as it answers, so each one after the first sees those before it).
        assert {(e["actor"]["role"], e["source"], e["data"]["route"])
                for e in everyone if e["actor"]["role"] != "monitor"} == {
            ("dsmb", "/services/audit", "/v1/audit/events")}
        # The DSMB reading the ledger's own history of the patient: filed straight in it.
        assert (await dsmb.get(f"/v1/audit/patients/{patient}/history")).status_code == 200
        history = (await dsmb.get(f"/v1/audit/patients/{patient}/history")).json()["items"]
        ledger_views = [e for e in history if e["type"] == "PatientDataViewed"
                        and e["actor"]["role"] == "dsmb"]
        assert "/v1/audit/patients/{patient_id}/history" in [
            e["data"]["route"] for e in ledger_views]
        assert all(e["actor"]["role"] != "site_coordinator" for e in history
                   if e["type"] == "PatientDataViewed")


async def _until(read: Callable[[], Awaitable[list[dict[str, Any]]]],
                 done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    async def check() -> bool:
        nonlocal found
        found = await read()
        return done(found)

    await eventually(check, 60, "the views in the audit trail")
    return found
