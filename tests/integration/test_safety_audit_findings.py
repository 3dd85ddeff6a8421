"""The safety defects of issue 10's audit on the real database: the intake, the consumer's facts,
and the status, each named after its defect."""

from __future__ import annotations

import uuid
from datetime import timedelta

from services.safety.commands import take_patient_fact
from shared.consumer import Delivery
from shared.events import ArmCrossedOver, CloudEvent, EventData, InfusionGiven
from shared.store import utcnow
from tests.integration.conftest import safety_events
from tests.integration.test_safety_support import (
    SafetyService,
    ae_body,
    cloud_event,
    patient_events,
    seed_patient,
)

# --- item 12 ------------------------------------------------------------------------------------


async def test_a_death_reported_as_not_serious_or_below_grade_5_is_refused_and_writes_nothing(
        safety: SafetyService) -> None:
    patient = await seed_patient(safety, "msc_low")
    before = await safety_events(safety)
    url = f"/v1/patients/{patient}/adverse-events"
    async with safety.client("investigator") as site:
        r = await site.post(url, json=ae_body(grade=3, serious=False, outcome="fatal"))
        assert r.status_code == 422, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "inconsistent_adverse_event"
        assert {e["field"] for e in r.json()["errors"]} == {"body.ctcae_grade", "body.serious"}
        assert await safety_events(safety) == before
        # a follow-up reporting the death of a grade 3 event must say grade 5 too
        r = await site.post(url, json=ae_body(grade=3, serious=True, relatedness="not_related"))
        ae_id = r.json()["adverse_event_id"]
        fu = f"{url}/{ae_id}/follow-ups"
        refused = await site.post(fu, json={"outcome": "fatal"})
        assert (refused.status_code, refused.json()["code"]) == (422, "inconsistent_adverse_event")
        assert [e["field"] for e in refused.json()["errors"]] == ["body.ctcae_grade"]
        death = await site.post(fu, json={"outcome": "fatal", "ctcae_grade": 5,
                                          "resolved_at": utcnow().isoformat()})
        assert death.status_code == 201, death.text
        assert death.json()["triggered_rules"] == ["R1-death"]
        status = (await site.get("/v1/safety/status")).json()
    assert status["trial"]["status"] == "halted"


# --- item 10 ------------------------------------------------------------------------------------


async def deliver(service: SafetyService, data: EventData,
                  event: CloudEvent | None = None) -> None:
    """Hand the safety consumer's handler one event, as the consumer would (in a transaction)."""
    async with service.runtime.store.transaction() as tx:
        await take_patient_fact(tx, Delivery(event or cloud_event(data), data, data.topic),
                                service.runtime.protocol)


def infusion_given(patient: str, arm: str, hours_ago: float) -> InfusionGiven:
    return InfusionGiven.model_validate({
        "infusion_id": str(uuid.uuid4()), "patient_id": patient, "site_id": "S1", "arm": arm,
        "week": 0, "cells_administered": 210_000_000, "cells_per_kg": 3_000_000,
        "weight_kg": 70.0, "lot_number": "L-1",
        "given_at": utcnow() - timedelta(hours=hours_ago)})


async def stream_types(service: SafetyService, stream: str) -> list[str]:
    return [e.type for e in await service.runtime.store.read_stream(stream)]


async def test_r4_fires_once_when_the_infusion_is_consumed_after_the_adverse_event(
        safety: SafetyService) -> None:
    patient = await seed_patient(safety, "msc_high", dosed_hours_ago=None)
    async with safety.client("investigator") as site:
        r = await site.post(f"/v1/patients/{patient}/adverse-events",
                            json=ae_body(grade=3, relatedness="unlikely"))  # onset 1 h ago
        assert r.status_code == 201, r.text
        assert (r.json()["infusion_related"], r.json()["triggered_rules"]) == (False, [])
        # the infusion given 2 h ago reaches safety only now, and again (at least once)
        given = infusion_given(patient, "msc_high", hours_ago=2)
        record = cloud_event(given, source="/services/dosing")
        await deliver(safety, given, record)
        await deliver(safety, given, record)
        status = (await site.get("/v1/safety/status")).json()
    assert await stream_types(safety, "rule-R4-infusion-reaction") == ["StoppingRuleTriggered"]
    (hold,) = [h for h in status["patient_holds"] if h["patient_id"] == patient]
    assert (hold["rule_id"], hold["product"]) == ("R4-infusion-reaction", "infusion")


async def test_a_follow_up_setting_infusion_related_holds_the_patients_infusions(
        safety: SafetyService) -> None:
    patient = await seed_patient(safety, "msc_low", dosed_hours_ago=None)
    async with safety.client("investigator") as site:
        r = await site.post(f"/v1/patients/{patient}/adverse-events",
                            json=ae_body(grade=3, relatedness="not_related", infusion_related=False))
        assert r.json()["triggered_rules"] == []
        fu = f"/v1/patients/{patient}/adverse-events/{r.json()['adverse_event_id']}/follow-ups"
        up = await site.post(fu, json={"infusion_related": True})
        assert up.status_code == 201, up.text
        assert up.json()["triggered_rules"] == ["R4-infusion-reaction"]
        same = await site.post(fu, json={"infusion_related": True, "outcome": "recovering"})
        assert same.json()["triggered_rules"] == []
    followed = [e for e in await safety.runtime.store.read_stream(f"patient-{patient}")
                if e.type == "AdverseEventFollowedUp"]
    assert [e.data["infusion_related"] for e in followed] == [True, True]


# --- item 14 ------------------------------------------------------------------------------------


async def test_an_adverse_event_reported_before_the_assignment_arrives_suspends_its_arm_once(
        safety: SafetyService) -> None:
    for _ in range(9):  # dosed patients of the arm, so that R6 stays below its bound
        await seed_patient(safety, "msc_high")
    enrolled, assignment = patient_events("msc_high")[:2]
    patient = enrolled.subject()
    await deliver(safety, enrolled)  # safety knows the patient, not yet the arm
    async with safety.client("investigator") as site, safety.client("dsmb") as dsmb:
        r = await site.post(f"/v1/patients/{patient}/adverse-events",
                            json=ae_body(grade=4, relatedness="definite", infusion_related=False))
        assert r.status_code == 201 and r.json()["triggered_rules"] == []
        assert (await dsmb.get("/v1/safety/status")).json()["arms"]["msc_high"]["toxicities"] == 0
        record = cloud_event(assignment, source="/services/randomization")
        await deliver(safety, assignment, record)
        await deliver(safety, assignment, record)  # redelivered
        status = (await dsmb.get("/v1/safety/status")).json()
    assert status["arms"]["msc_high"]["status"] == "suspended"
    assert status["arms"]["msc_high"]["toxicities"] == 1
    assert [h["rule_id"] for h in status["arms"]["msc_high"]["holds"]] == ["R2-related-grade4"]
    assert await stream_types(safety, "rule-R2-related-grade4") == ["StoppingRuleTriggered"]


# --- item 11 ------------------------------------------------------------------------------------


async def test_reporting_clocks_are_recorded_and_listed_and_a_follow_up_moves_a_susar_to_7_days(
        safety: SafetyService) -> None:
    patient = await seed_patient(safety, "msc_low", dosed_hours_ago=None)
    other_site = await seed_patient(safety, "msc_low", site="S2", dosed_hours_ago=None)
    url = f"/v1/patients/{patient}/adverse-events"
    async with safety.client("investigator") as site, safety.client("dsmb") as dsmb, \
            safety.client("investigator", "S2") as site2:
        r = await site.post(url, json=ae_body(grade=3, serious=True, expected=False,
                                              relatedness="probable", infusion_related=False))
        assert "R5-susar" in r.json()["triggered_rules"]
        ae_id = r.json()["adverse_event_id"]
        before = (await dsmb.get("/v1/safety/status")).json()
        up = await site.post(f"{url}/{ae_id}/follow-ups", json={"ctcae_grade": 4})
        assert up.status_code == 201, up.text
        after = (await dsmb.get("/v1/safety/status")).json()
        r = await site2.post(f"/v1/patients/{other_site}/adverse-events",
                             json=ae_body(grade=2, serious=True, relatedness="not_related"))
        assert r.status_code == 201
        seen_by_s1 = (await site.get("/v1/safety/status")).json()
    assert [(d["days"], d["superseded"], d["overdue"]) for d in before["susar_reports_due"]] == [
        (15, False, False)]
    dues = sorted((d["days"], d["superseded"]) for d in after["susar_reports_due"])
    assert dues == [(7, False), (15, True)]
    kinds = sorted(c["kind"] for c in after["reporting_clocks"])
    assert kinds == ["sae_initial_report", "susar_follow_up_report", "susar_report",
                     "susar_report"]
    assert all(c["overdue"] is False for c in after["reporting_clocks"])
    assert {c["patient_id"] for c in seen_by_s1["reporting_clocks"]} == {patient}
    stream = await stream_types(safety, f"patient-{patient}")
    assert stream.count("SusarReportDue") == 2
    assert stream.count("SusarFollowUpReportDue") == 1
    assert stream.count("SeriousAdverseEventReportDue") == 1


# --- item 15 ------------------------------------------------------------------------------------


async def test_a_transaminases_increased_report_holds_methotrexate(safety: SafetyService) -> None:
    patient = await seed_patient(safety, "mtx")
    async with safety.client("investigator") as site:
        r = await site.post(f"/v1/patients/{patient}/adverse-events", json=ae_body(
            grade=2, relatedness="not_related", term="TRANSAMINASES increased"))
        assert r.status_code == 201, r.text
        assert r.json()["triggered_rules"] == ["R7-mtx-liver"]
        status = (await site.get("/v1/safety/status")).json()
    (hold,) = [h for h in status["patient_holds"] if h["patient_id"] == patient]
    assert (hold["rule_id"], hold["product"]) == ("R7-mtx-liver", "methotrexate")


# --- item 13 ------------------------------------------------------------------------------------


async def test_a_crossover_consumed_after_the_event_counts_it_for_the_arm_crossed_into(
        safety: SafetyService) -> None:
    for arm in ("mtx", "msc_low") * 3:  # dosed patients, so that R6 stays below its bound
        await seed_patient(safety, arm)
    patient = await seed_patient(safety, "mtx", dosed_hours_ago=30)
    async with safety.client("investigator") as site, safety.client("dsmb") as dsmb:
        r = await site.post(f"/v1/patients/{patient}/adverse-events", json=ae_body(
            grade=4, relatedness="definite", infusion_related=False))  # onset 1 h ago
        assert r.json()["triggered_rules"] == ["R2-related-grade4"]
        assert (await dsmb.get("/v1/safety/status")).json()["arms"]["mtx"]["toxicities"] == 1
        # the crossover, 2 h ago, reaches safety only now (and twice)
        crossed = ArmCrossedOver(patient_id=patient, site_id="S1", from_arm="mtx",
                                 to_arm="msc_low", reason="no response",
                                 crossed_over_at=utcnow() - timedelta(hours=2))
        record = cloud_event(crossed, source="/services/randomization")
        await deliver(safety, crossed, record)
        await deliver(safety, crossed, record)
        status = (await dsmb.get("/v1/safety/status")).json()
    assert status["arms"]["msc_low"]["status"] == "suspended"
    assert [h["rule_id"] for h in status["arms"]["msc_low"]["holds"]] == ["R2-related-grade4"]
    assert (status["arms"]["mtx"]["toxicities"], status["arms"]["msc_low"]["toxicities"]) == (0, 1)
    # received methotrexate, not yet cells: dosed in mtx only
    assert (status["arms"]["mtx"]["patients_dosed"],
            status["arms"]["msc_low"]["patients_dosed"]) == (4, 3)
    assert await stream_types(safety, "rule-R2-related-grade4") == ["StoppingRuleTriggered"] * 2


# --- item 16 ------------------------------------------------------------------------------------


async def test_the_dsmb_imposes_a_hold_with_its_rationale_and_lifts_it_like_any_other(
        safety: SafetyService) -> None:
    patient = await seed_patient(safety, "msc_high")
    rationale = "Unexplained liver signal across sites: hold the arm pending review."
    hold = {"scope": "arm", "target": "msc_high", "decision": "hold", "rationale": rationale}
    async with safety.client("investigator") as site, safety.client("dsmb") as dsmb:
        assert (await site.post("/v1/safety/decisions", json=hold)).status_code == 403
        bad = await dsmb.post("/v1/safety/decisions", json={**hold, "target": "placebo"})
        assert (bad.status_code, bad.json()["code"]) == (404, "hold_target_not_found")
        r = await dsmb.post("/v1/safety/decisions", json=hold)
        assert r.status_code == 201, r.text
        (held,) = r.json()["held"]
        assert (held["kind"], held["rule_id"], r.json()["decision"]) == (
            "ArmSuspended", "DSMB", "hold")
        r = await dsmb.post("/v1/safety/decisions", json={
            "scope": "patient", "target": patient, "decision": "hold", "product": "infusion",
            "rationale": rationale})
        assert r.status_code == 201, r.text
        status = (await site.get("/v1/safety/status")).json()
        assert status["arms"]["msc_high"]["status"] == "suspended"
        assert [(h["rule_id"], h["decision_id"]) for h in status["arms"]["msc_high"]["holds"]] \
            == [("DSMB", held["decision_id"])]
        (patient_hold,) = [h for h in status["patient_holds"] if h["patient_id"] == patient]
        assert (patient_hold["rule_id"], patient_hold["product"]) == ("DSMB", "infusion")
        resumed = await dsmb.post("/v1/safety/decisions", json={
            "scope": "arm", "target": "msc_high", "decision": "resume",
            "rationale": "Reviewed: the signal was a lab artefact; resume."})
        assert [x["hold_id"] for x in resumed.json()["lifted"]] == [held["hold_id"]]
        after = (await site.get("/v1/safety/status")).json()
    assert after["arms"]["msc_high"]["status"] == "active"
    (imposed,) = [e for e in await safety.runtime.store.read_stream("arm-msc_high")
                  if e.type == "ArmSuspended"]
    assert imposed.data["decision_id"] == held["decision_id"]
    assert imposed.data["rationale"] == rationale and imposed.metadata["role"] == "dsmb"
