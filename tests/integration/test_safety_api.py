"""The safety API on the real database: intake, validation, follow-ups, labs, DSMB decisions, status."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.store import utcnow
from tests.integration.conftest import safety_events
from tests.integration.test_safety_support import (
    SafetyService,
    ae_body,
    seed_patient,
)


async def test_bad_adverse_event_reports_get_a_clear_4xx_and_write_nothing(
        safety: SafetyService) -> None:
    patient = await seed_patient(safety, "msc_low")
    other_site = await seed_patient(safety, "msc_low", site="S2")
    before = await safety_events(safety)
    url = f"/v1/patients/{patient}/adverse-events"
    async with safety.client() as site, safety.client("pharmacist") as pharmacist, \
            safety.client("monitor") as monitor:
        cases = [
            (await site.post(url, json=ae_body(grade=6)), 422, "validation_error"),
            (await site.post(url, json=ae_body(grade=0)), 422, "validation_error"),
            (await site.post(url, json=ae_body(grade="3")), 422, "validation_error"),
            (await site.post(url, json=ae_body(relatedness="maybe")), 422, "validation_error"),
            (await site.post(url, json=ae_body(serious="yes")), 422, "validation_error"),
            (await site.post(url, json={**ae_body(), "patient_name": "Jane"}), 422,
             "validation_error"),
            (await site.post(url, json={k: v for k, v in ae_body().items() if k != "expected"}),
             422, "validation_error"),
            (await site.post(url, json=ae_body(onset_at="2026-01-01T10:00:00")), 422,
             "validation_error"),  # no zone
            (await site.post(url, json=ae_body(
                onset_at=(utcnow() + timedelta(days=2)).isoformat())), 422, "onset_in_future"),
            (await site.post(url, content=b"{nope", headers={"content-type": "application/json"}),
             400, "malformed_json"),
            (await site.post("/v1/patients/PT-NOBODY/adverse-events", json=ae_body()), 404,
             "patient_not_found"),
            (await site.post(f"/v1/patients/{other_site}/adverse-events", json=ae_body()), 404,
             "patient_not_found"),
            (await pharmacist.post(url, json=ae_body()), 403, "forbidden"),
            (await monitor.post(url, json=ae_body()), 403, "forbidden"),
        ]
        for response, status, code in cases:
            assert response.status_code == status, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["code"] == code
        assert cases[0][0].json()["errors"][0]["field"] == "body.ctcae_grade"
    # (a refused write of a known principal may be logged as AccessDenied; no safety event is)
    assert await safety_events(safety) == before


async def test_an_adverse_event_is_recorded_with_derived_infusion_relation_and_followed_up(
        safety: SafetyService) -> None:
    patient = await seed_patient(safety, "msc_high", dosed_hours_ago=2)
    async with safety.client("investigator") as site:
        r = await site.post(f"/v1/patients/{patient}/adverse-events",
                            json=ae_body(grade=3, relatedness="unlikely"),
                            headers={"X-Request-ID": "req-ae-1"})
        assert r.status_code == 201, r.text
        ae_id = r.json()["adverse_event_id"]
        # onset 1 h after an infusion: infusion-related, grade 3: R4 holds the patient's infusions
        assert r.json()["infusion_related"] is True
        assert r.json()["triggered_rules"] == ["R4-infusion-reaction"]
        far = await site.post(f"/v1/patients/{patient}/adverse-events", json=ae_body(
            grade=1, onset_at=(utcnow() - timedelta(hours=30)).isoformat()))
        assert far.json()["infusion_related"] is False  # onset before the infusion
        up = await site.post(f"/v1/patients/{patient}/adverse-events/{ae_id}/follow-ups",
                             json={"ctcae_grade": 4, "relatedness": "probable"})
        assert up.status_code == 201, up.text
        assert "R2-related-grade4" in up.json()["triggered_rules"]
        same = await site.post(f"/v1/patients/{patient}/adverse-events/{ae_id}/follow-ups",
                               json={"outcome": "recovered",
                                     "resolved_at": utcnow().isoformat()})
        assert same.status_code == 201 and same.json()["triggered_rules"] == []
        empty = await site.post(f"/v1/patients/{patient}/adverse-events/{ae_id}/follow-ups",
                                json={})
        assert (empty.status_code, empty.json()["code"]) == (422, "empty_follow_up")
        nope = await site.post(f"/v1/patients/{patient}/adverse-events/AE-NOPE/follow-ups",
                               json={"ctcae_grade": 2})
        assert (nope.status_code, nope.json()["code"]) == (404, "adverse_event_not_found")
    stream = await safety.runtime.store.read_stream(f"patient-{patient}")
    types = [e.type for e in stream]
    assert types.count("AdverseEventReported") == 2
    assert types.count("AdverseEventFollowedUp") == 2
    first = next(e for e in stream if e.type == "AdverseEventReported"
                 and e.data["adverse_event_id"] == ae_id)
    assert first.data["ctcae_grade"] == 3 and first.data["relatedness"] == "unlikely"
    assert first.metadata["correlation_id"] == "req-ae-1"
    assert first.metadata["role"] == "investigator" and first.data["arm"] == "msc_high"
    # the rule firings were caused by the reports, in the same transaction
    rule_events = await safety.runtime.store.read_stream("rule-R2-related-grade4")
    assert len(rule_events) == 1
    assert rule_events[0].metadata["correlation_id"] != "req-ae-1"  # the follow-up's request
    assert rule_events[0].metadata["causation_id"] in {e.event_id for e in stream}


async def test_lab_results_hold_methotrexate_and_are_validated(safety: SafetyService) -> None:
    patient = await seed_patient(safety, "mtx")
    url = f"/v1/patients/{patient}/lab-results"
    collected = (utcnow() - timedelta(hours=3)).isoformat()
    async with safety.client() as site, safety.client("pharmacist") as pharmacist:
        bad = [
            await site.post(url, json={"collected_at": collected, "results": [
                {"analyte": "ALT", "value": 150, "unit": "U/L"}]}),
            await site.post(url, json={"collected_at": collected, "results": [
                {"analyte": "WBC", "value": 2.0, "unit": "cells"}]}),
            await site.post(url, json={"collected_at": collected, "results": [
                {"analyte": "bilirubin", "value": 2.0, "unit": "mg/dL"}]}),
            await site.post(url, json={"collected_at": collected, "results": []}),
        ]
        assert [r.status_code for r in bad] == [422, 422, 422, 422]
        assert bad[0].json()["errors"][0]["field"] == "body.results.0.uln"
        assert (await pharmacist.post(url, json={"collected_at": collected, "results": [
            {"analyte": "WBC", "value": 5.0, "unit": "10^9/L"}]})).status_code == 403
        fine = await site.post(url, json={"collected_at": collected, "results": [
            {"analyte": "ALT", "value": 120, "unit": "U/L", "uln": 40},
            {"analyte": "platelets", "value": 100, "unit": "10^9/L"}]})
        assert fine.status_code == 201 and fine.json()["triggered_rules"] == []
        liver = await site.post(url, json={"collected_at": collected, "results": [
            {"analyte": "AST", "value": 121, "unit": "IU/L", "uln": 40}]})
        assert liver.status_code == 201 and liver.json()["triggered_rules"] == ["R7-mtx-liver"]
        status = (await site.get("/v1/safety/status")).json()
    (hold,) = [h for h in status["patient_holds"] if h["patient_id"] == patient]
    assert hold["rule_id"] == "R7-mtx-liver" and hold["product"] == "methotrexate"
    labs = [e for e in await safety.runtime.store.read_stream(f"patient-{patient}")
            if e.type == "LabResultReported"]
    assert len(labs) == 2 and labs[1].data["results"][0]["uln"] == 40


async def test_only_the_dsmb_lifts_a_hold_with_a_rationale_and_exactly_the_named_one(
        safety: SafetyService) -> None:
    patients = [await seed_patient(safety, "msc_high") for _ in range(5)]
    async with safety.client() as site, safety.client("monitor") as monitor, \
            safety.client("dsmb") as dsmb:
        r = await site.post(f"/v1/patients/{patients[0]}/adverse-events",
                            json=ae_body(grade=4, relatedness="definite",
                                         onset_at=(utcnow() - timedelta(days=3)).isoformat()))
        assert r.json()["triggered_rules"] == ["R2-related-grade4"]  # 1 of 5 dosed: R6 quiet
        status = (await site.get("/v1/safety/status")).json()
        assert status["arms"]["msc_high"]["status"] == "suspended"
        (hold,) = status["arms"]["msc_high"]["holds"]
        resume = {"scope": "arm", "target": "msc_high", "decision": "resume",
                  "rationale": "DSMB reviewed the case: unrelated to product lot; resume."}
        assert (await site.post("/v1/safety/decisions", json=resume)).status_code == 403
        assert (await monitor.post("/v1/safety/decisions", json=resume)).status_code == 403
        short = await dsmb.post("/v1/safety/decisions", json={**resume, "rationale": "ok"})
        assert (short.status_code, short.json()["code"]) == (422, "validation_error")
        none = await dsmb.post("/v1/safety/decisions", json={**resume, "target": "mtx"})
        assert (none.status_code, none.json()["code"]) == (409, "no_active_hold")
        wrong = await dsmb.post("/v1/safety/decisions", json={**resume, "hold_id": "nope"})
        assert (wrong.status_code, wrong.json()["code"]) == (404, "hold_not_found")
        lifted = await dsmb.post("/v1/safety/decisions", json={**resume,
                                                                "hold_id": hold["hold_id"]})
        assert lifted.status_code == 201, lifted.text
        assert [x["hold_id"] for x in lifted.json()["lifted"]] == [hold["hold_id"]]
        after = (await monitor.get("/v1/safety/status")).json()
        assert after["arms"]["msc_high"]["status"] == "active"
        assert after["triggered_rules"][0]["rule_id"] == "R2-related-grade4"
        # new evidence puts a new hold on
        again = await site.post(f"/v1/patients/{patients[1]}/adverse-events",
                                json=ae_body(grade=4, relatedness="probable"))
        assert "R2-related-grade4" in again.json()["triggered_rules"]
        holds = (await monitor.get("/v1/safety/status")).json()["arms"]["msc_high"]["holds"]
        assert holds and hold["hold_id"] not in {h["hold_id"] for h in holds}
    (lift,) = [e for e in await safety.runtime.store.read_stream("arm-msc_high")
               if e.type == "SafetyHoldLifted"]
    assert lift.data["hold_id"] == hold["hold_id"] and lift.data["decided_by"] == "dev-dsmb"
    assert lift.metadata["reason"] == resume["rationale"] and lift.metadata["role"] == "dsmb"


async def test_the_status_shows_arms_posteriors_and_hides_other_sites_patients(
        safety: SafetyService) -> None:
    s1 = await seed_patient(safety, "mtx", site="S1")
    s2 = await seed_patient(safety, "mtx", site="S2")
    async with safety.client("site_coordinator", "S1") as site1, \
            safety.client("investigator", "S2") as site2, safety.client("dsmb") as dsmb:
        for client, patient in ((site1, s1), (site2, s2)):
            r = await client.post(f"/v1/patients/{patient}/lab-results", json={
                "collected_at": utcnow().isoformat(),
                "results": [{"analyte": "neutrophils", "value": 0.5, "unit": "10^9/L"}]})
            assert r.json()["triggered_rules"] == ["R8-mtx-marrow"]
        r = await site1.post(f"/v1/patients/{s1}/adverse-events",
                             json=ae_body(grade=3, relatedness="possible"))
        assert r.status_code == 201
        seen_by_s1 = (await site1.get("/v1/safety/status")).json()
        seen_by_dsmb = (await dsmb.get("/v1/safety/status")).json()
    assert {h["patient_id"] for h in seen_by_s1["patient_holds"]} == {s1}
    assert {h["patient_id"] for h in seen_by_dsmb["patient_holds"]} == {s1, s2}
    mtx = seen_by_dsmb["arms"]["mtx"]
    # k = 1 toxicity among n = 2 dosed: P(rate > 0.2) = P(Bin(3, 0.2) <= 1) = 0.896 > 0.8
    assert (mtx["patients_dosed"], mtx["toxicities"]) == (2, 1)
    assert mtx["posterior_probability"] == pytest.approx(0.896)
    assert mtx["status"] == "suspended" and mtx["posterior_exceeded"] is True
    assert seen_by_dsmb["arms"]["msc_low"]["posterior_probability"] == pytest.approx(0.8)
    assert seen_by_dsmb["trial"] == {**seen_by_dsmb["trial"], "status": "active",
                                     "enrollment": "open", "rule_set_version": "1.1.0"}
    rules = {f["rule_id"] for f in seen_by_dsmb["triggered_rules"]}
    assert rules == {"R8-mtx-marrow", "R6-bayes-toxicity"}
