"""Every dosing guard through the gateway, and two posts racing for one visit."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from aiokafka import ConsumerRecord

from shared.events import DOSING, CloudEvent
from tests.e2e.conftest import client
from tests.e2e.test_dosing_patients import (
    INFUSION_ARMS,
    dose_body,
    dose_path,
    give,
    randomized_patient,
    schedule_of,
)
from tests.support import read_topic
from tooling.launcher import System


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert (r.status_code, r.headers["content-type"]) == (status, "application/problem+json"), \
        r.text
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    return body


async def test_every_infusion_guard_through_the_gateway(system: System) -> None:
    async with client(system) as site, client(system, site="S2") as other_site, \
            client(system, "monitor") as monitor:
        patient_id, arm = await randomized_patient(site, INFUSION_ARMS)
        await schedule_of(site, patient_id)
        planned = 70 * (1_000_000 if arm == "msc_low" else 3_000_000)
        path = dose_path(patient_id, arm)

        body = assert_problem(await give(site, patient_id, arm, cells_administered=planned * 2),
                              422, "dose_mismatch")
        assert body["planned_cells"] == planned
        assert_problem(await give(site, patient_id, arm, week=4), 422, "not_a_dosing_week")
        assert_problem(await site.post(f"/v1/patients/{patient_id}/methotrexate-doses",
                                       json=dose_body("mtx")), 422, "wrong_arm")
        body = assert_problem(await give(site, patient_id, arm, week=1), 422, "out_of_window")
        assert body["window_start"] < body["due_date"] < body["window_end"]
        assert_problem(await site.post(path, json={**dose_body(arm), "weight_kg": "heavy"}),
                       422, "validation_error")
        assert_problem(await other_site.post(path, json=dose_body(arm)), 404, "patient_not_found")
        assert_problem(await monitor.post(path, json=dose_body(arm)), 403, "forbidden")
        untouched = await schedule_of(site, patient_id)
        assert all(v["status"] == "planned" for v in untouched["visits"])  # nothing was written

        r = await give(site, patient_id, arm)
        assert r.status_code == 201, r.text
        given = r.json()
        assert given["infusion_id"] and given["cells_administered"] == planned
        assert given["status"] == "given" and given["week"] == 0
        assert_problem(await give(site, patient_id, arm), 409, "already_given")

        # Out of window and far off the planned cells, with a reason: recorded as a deviation.
        r = await give(site, patient_id, arm, week=1, cells_administered=planned // 2,
                       deviation_reason="patient travelling; half a bag available")
        assert r.status_code == 201, r.text
        deviation = r.json()["deviation"]
        assert deviation["deviations"] == ["out_of_window", "dose_mismatch"]

        after = await schedule_of(site, patient_id, until=lambda s: s["day_zero_fixed"])
        statuses = {(v["kind"], v["week"]): v["status"] for v in after["visits"]}
        assert statuses[("infusion", 0)] == statuses[("infusion", 1)] == "given"
        assert statuses[("infusion", 2)] == "planned"

        def published(records: list[ConsumerRecord]) -> bool:
            types = {e.type for e in _ours(records, patient_id)}
            return {"InfusionGiven", "ProtocolDeviationRecorded",
                    "DosingScheduleReanchored"} <= types

        records = await read_topic(system.bootstrap, DOSING, until=published, timeout=120)
        recorded = [e for e in _ours(records, patient_id) if e.type == "ProtocolDeviationRecorded"]
        assert len(recorded) == 1
        assert recorded[0].data["dose_event_id"] == r.json()["infusion_id"]
        assert recorded[0].actor is not None and recorded[0].correlationid


def _ours(records: list[ConsumerRecord], patient_id: str) -> list[CloudEvent]:
    events = [CloudEvent.from_bytes(r.value) for r in records]
    return [e for e in events if e.subject == patient_id]


async def test_methotrexate_range_and_withdrawal_through_the_gateway(system: System) -> None:
    async with client(system) as site:
        patient_id, arm = await randomized_patient(site, frozenset({"mtx"}))
        await schedule_of(site, patient_id)
        for dose_mg in (4.5, 25.5):
            body = assert_problem(await give(site, patient_id, arm, dose_mg=dose_mg), 422,
                                  "dose_out_of_range")
            assert body["range_mg"] == [5, 25]
        assert_problem(await site.post(dose_path(patient_id, "msc_low"),
                                       json=dose_body("msc_low")), 422, "wrong_arm")
        r = await give(site, patient_id, arm, dose_mg=7.5)
        assert r.status_code == 201 and r.json()["dose_mg"] == 7.5, r.text

        leaving, leaving_arm = await randomized_patient(site)
        await schedule_of(site, leaving)
        r = await site.post(f"/v1/patients/{leaving}/withdrawal", json={"reason": "moved away"})
        assert r.status_code == 200, r.text
        withdrawn = await schedule_of(site, leaving, until=lambda s: s["withdrawn"])
        assert {v["status"] for v in withdrawn["visits"]} == {"cancelled"}
        assert_problem(await give(site, leaving, leaving_arm), 409, "withdrawn")


async def test_two_concurrent_posts_for_one_visit_record_one_dose(system: System) -> None:
    async with client(system) as site, client(system, "pharmacist") as pharmacist:
        patient_id, arm = await randomized_patient(site)
        await schedule_of(site, patient_id)
        responses = await asyncio.gather(
            *(poster.post(dose_path(patient_id, arm), json=dose_body(arm))
              for poster in (site, pharmacist, site, pharmacist)))
        codes = sorted(r.status_code for r in responses)
        assert codes == [201, 409, 409, 409], [r.text for r in responses]
        assert all(r.json()["code"] in ("already_given", "conflict")
                   for r in responses if r.status_code == 409)
        calendar = await schedule_of(site, patient_id)
        given = [v for v in calendar["visits"] if v["status"] == "given"]
        assert [(v["kind"] != "assessment", v["week"]) for v in given] == [(True, 0)]
