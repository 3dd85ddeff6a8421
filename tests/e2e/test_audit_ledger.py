"""The audit ledger after a flow through every service: complete, once each, verifiable, and the
monitor's view of one patient: the whole history across services, in order, with who and why."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections import Counter
from typing import Any

import httpx

from shared.store import EventStore, RecordedEvent
from tests.e2e.conftest import screening, token
from tests.e2e.test_dosing_patients import dose_body, dose_path, schedule_of
from tests.support import eventually
from tooling.launcher import System

ADVERSE_EVENT = {"term": "headache", "onset_at": "2026-11-26T08:00:00Z", "ctcae_grade": 1,
                 "serious": False, "relatedness": "unlikely", "expected": True,
                 "infusion_related": None}
LAB = {"collected_at": "2026-11-26T08:00:00Z",
       "results": [{"analyte": "ALT", "value": 30.0, "unit": "U/L", "uln": 40.0}]}


def _as(system: System, role: str, site: str | None, sub: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=system.url(), timeout=60,
                             headers={"Authorization": f"Bearer {token(role, site, sub)}"})


async def _all_events(url: str) -> list[RecordedEvent]:
    store = EventStore(url)
    try:
        found: list[RecordedEvent] = []
        while batch := await store.read_all(after=found[-1].position if found else 0):
            found += batch
        return found
    finally:
        await store.close()


def _about(event: RecordedEvent, patient: str, screening_id: str) -> bool:
    return event.data.get("patient_id") == patient or event.data.get("screening_id") == screening_id


async def _safety_knows(system: System, patient: str) -> None:
    """Safety learns of a patient from trial.enrollment; until then a report about it is a 404
    (and an AccessDenied). Wait, without writing, until safety's record of it is in the ledger."""
    monitor = _as(system, "monitor", None, "mon-wait")
    try:
        async def known() -> bool:
            resp = await monitor.get("/v1/audit/events", params={
                "patient_id": patient, "type": "PatientSafetyFactRecorded"})
            return any(i["data"]["fact"] == "enrolled" for i in resp.json()["items"])

        await eventually(known, timeout=120, what="safety to learn of the patient")
    finally:
        await monitor.aclose()


async def _flow(system: System, tag: str) -> dict[str, Any]:
    """One patient through every service; returns what the assertions need."""
    coordinator = _as(system, "site_coordinator", "S1", f"coord-{tag}")
    investigator = _as(system, "investigator", "S1", f"inv-{tag}")
    pharmacist = _as(system, "pharmacist", "S1", f"pharm-{tag}")
    stranger = _as(system, "site_coordinator", "S2", f"stranger-{tag}")
    try:
        r = await coordinator.post("/v1/screenings", json=screening("S1"),
                                   headers={"X-Request-ID": f"req-{tag}-screen"})
        assert r.status_code == 201, r.text
        screening_id = r.json()["screening_id"]
        r = await coordinator.post("/v1/patients", json={"screening_id": screening_id})
        assert r.status_code == 201, r.text
        patient = r.json()["patient_id"]
        r = await investigator.post(f"/v1/patients/{patient}/randomization")
        assert r.status_code == 201, r.text
        arm = r.json()["arm"]
        await schedule_of(coordinator, patient)
        r = await pharmacist.post(dose_path(patient, arm), json=dose_body(arm))
        assert r.status_code == 201, r.text
        await _safety_knows(system, patient)
        r = await investigator.post(f"/v1/patients/{patient}/adverse-events", json=ADVERSE_EVENT)
        assert r.status_code == 201, r.text
        r = await investigator.post(f"/v1/patients/{patient}/lab-results", json=LAB)
        assert r.status_code == 201, r.text
        # Two refused writes: a role the action is closed to (the gateway refuses), and another
        # site (the service answers 404). Both are probing a monitor must see.
        r = await pharmacist.post(f"/v1/patients/{patient}/withdrawal", json={"reason": "nope"})
        assert r.status_code == 403, r.text
        r = await stranger.post(f"/v1/patients/{patient}/withdrawal",
                                json={"reason": "not my patient"})
        assert r.status_code == 404, r.text
        r = await investigator.post(f"/v1/patients/{patient}/withdrawal",
                                    json={"reason": "moved to another country"})
        assert r.status_code == 200, r.text
    finally:
        for c in (coordinator, investigator, pharmacist, stranger):
            await c.aclose()
    return {"patient": patient, "screening_id": screening_id, "arm": arm}


async def test_every_event_of_every_store_is_in_the_ledger_once_and_the_chain_verifies(
        system: System) -> None:
    tag = uuid.uuid4().hex[:8]
    flow = await _flow(system, tag)
    sources = [s for s in system.database_urls if s != "audit"]

    async def complete() -> tuple[list[RecordedEvent], list[RecordedEvent]] | None:
        source_events = [e for s in sources for e in await _all_events(system.database_urls[s])]
        ledger = await _all_events(system.database_urls["audit"])
        missing = {e.event_id for e in source_events} - {e.event_id for e in ledger}
        return None if missing else (source_events, ledger)

    source_events, ledger = await eventually(complete, 120, "every source event in the ledger")
    counts = Counter(e.event_id for e in ledger)
    assert all(n == 1 for n in counts.values()), counts.most_common(3)
    ours = [e for e in source_events if _about(e, flow["patient"], flow["screening_id"])]
    # Every service took part: randomization, dosing, safety (and the refusals' access log).
    assert {e.metadata.get("actor") for e in ours} >= {f"coord-{tag}", f"inv-{tag}",
                                                       f"pharm-{tag}", f"stranger-{tag}"}
    types = {e.type for e in ours}
    assert {"PatientScreened", "PatientEnrolled", "ArmAssigned", "DosingScheduleCreated",
            "AdverseEventReported", "PatientWithdrawn", "AccessDenied"} <= types
    assert types & {"InfusionGiven", "MethotrexateDoseGiven"}
    # Each ledger entry carries its source's data as published (a screening's without its
    # number and criteria, D51) and its envelope unchanged.
    by_id = {e.event_id: e for e in ledger}
    for event in ours:
        entry = by_id[event.event_id]
        published = ({**event.data, "screening_number": None, "reasons": []}
                     if event.type == "PatientScreened" else event.data)
        assert (entry.type, entry.data) == (event.type, published)
        assert entry.metadata.get("actor") == event.metadata.get("actor")
    async with _as(system, "monitor", None, f"mon-{tag}") as monitor:
        verify = (await monitor.get("/v1/audit/verify")).json()
        assert verify["ok"] is True and verify["first_broken_position"] is None
        assert verify["events_checked"] >= len(ledger)

        # The running ledger anchors its chain on the broker (D27): soon the head we just saw is
        # witnessed there too, and the ledger still matches every anchor.
        async def anchored() -> dict[str, object] | None:
            now = (await monitor.get("/v1/audit/verify")).json()
            return now if now["anchors_checked"] and now["anchors_checked"] >= 1 else None

        later = await eventually(anchored, 120, "an anchor of the ledger on the broker")
        assert later["ok"] is True and later["first_anchor_mismatch"] is None


async def test_a_monitor_sees_a_patients_whole_history_in_order_with_actors(system: System) -> None:
    tag = uuid.uuid4().hex[:8]
    flow = await _flow(system, tag)
    patient, screening_id = flow["patient"], flow["screening_id"]
    sources = [s for s in system.database_urls if s != "audit"]
    async with _as(system, "monitor", None, f"mon-{tag}") as monitor:

        async def history() -> list[dict[str, Any]] | None:
            expected = {e.event_id for s in sources
                        for e in await _all_events(system.database_urls[s])
                        if _about(e, patient, screening_id)}
            r = await monitor.get(f"/v1/audit/patients/{patient}/history")
            items: list[dict[str, Any]] = r.json().get("items", []) if r.status_code == 200 else []
            # Beside the services' events: the monitor's own earlier reads of this history
            # (PatientDataViewed, D50; tested in test_patient_views.py).
            facts = [i for i in items if i["type"] != "PatientDataViewed"]
            return facts if {i["event_id"] for i in facts} == expected else None

        items = await eventually(history, 120, "the patient's whole history in the ledger")
        types = [i["type"] for i in items]
        dose = "InfusionGiven" if "InfusionGiven" in types else "MethotrexateDoseGiven"
        story = ["PatientScreened", "PatientEnrolled", "ArmAssigned", "DosingScheduleCreated",
                 dose, "AdverseEventReported", "PatientWithdrawn"]
        assert [t for t in types if t in story] == story, types
        # Causes before effects, and otherwise in the sources' time.
        seen: set[str] = set()
        ids = {i["event_id"] for i in items}
        for item in items:
            if item["causation_id"] in ids:
                assert item["causation_id"] in seen, item
            seen.add(item["event_id"])
        by_type = {i["type"]: i for i in items}
        assert by_type["PatientScreened"]["actor"] == {
            "sub": f"coord-{tag}", "role": "site_coordinator", "site": "S1"}
        assert by_type["PatientScreened"]["correlation_id"] == f"req-{tag}-screen"
        assert by_type["ArmAssigned"]["actor"]["sub"] == f"inv-{tag}"
        assert by_type[dose]["actor"] == {"sub": f"pharm-{tag}", "role": "pharmacist", "site": "S1"}
        assert by_type["PatientWithdrawn"]["reason"] == "moved to another country"
        assert by_type["DosingScheduleCreated"]["source"] == "/services/dosing"
        assert by_type["AdverseEventReported"]["source"] == "/services/safety"
        denied = [i for i in items if i["type"] == "AccessDenied"]
        assert sorted((i["actor"]["sub"], i["data"]["status"]) for i in denied) == sorted(
            [(f"pharm-{tag}", 403), (f"stranger-{tag}", 404)])
        assert all(i["time"].endswith("+00:00") for i in items)

        # The filtered ledger (ledger order, paginated) holds the same entries, screening aside.
        pages: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"patient_id": patient, "limit": 3}
            if cursor:
                params["cursor"] = cursor
            body = (await monitor.get("/v1/audit/events", params=params)).json()
            pages += body["items"]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        positions = [i["position"] for i in pages]
        assert positions == sorted(positions)
        # Services may still be reacting (safety's facts, dosing's cancelled visits): later
        # entries only ever come after, so what the history held is all in the pages.
        assert {i["event_id"] for i in pages} >= ids - {by_type["PatientScreened"]["event_id"]}
        assert by_type["PatientScreened"]["event_id"] not in {i["event_id"] for i in pages}

        # Filters compose: one actor's refused writes, within the flow's time range.
        first, last = items[0]["time"], max(i["time"] for i in items)
        r = await monitor.get("/v1/audit/events", params={
            "actor": f"pharm-{tag}", "type": "AccessDenied", "source": "/services/randomization",
            "since": first, "until": "2999-01-01T00:00:00Z"})
        assert [i["data"]["path"] for i in r.json()["items"]] == [
            f"/v1/patients/{patient}/withdrawal"]
        r = await monitor.get("/v1/audit/events", params={"patient_id": patient, "until": first})
        assert r.json()["items"] == []
        r = await monitor.get("/v1/audit/events", params={"patient_id": patient, "since": last})
        later = r.json()["items"]
        assert all(i["time"] >= last for i in later) and last in {i["time"] for i in later}

        # The export: the same entries, as NDJSON and as CSV, streamed.
        r = await monitor.get("/v1/audit/export", params={"patient_id": patient})
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        exported = [json.loads(line) for line in r.text.splitlines()]
        seen_until = pages[-1]["position"]  # the ledger is append-only: this prefix is fixed
        assert [e for e in exported if e["position"] <= seen_until] == pages
        r = await monitor.get("/v1/audit/export", params={"patient_id": patient, "format": "csv"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        rows = [row for row in csv.DictReader(io.StringIO(r.text))
                if int(row["position"]) <= seen_until]
        assert [row["event_id"] for row in rows] == [i["event_id"] for i in pages]
        assert {row["actor_sub"] for row in rows} >= {f"inv-{tag}", f"pharm-{tag}"}
        withdrawn = next(row for row in rows if row["type"] == "PatientWithdrawn")
        assert withdrawn["reason"] == "moved to another country"
        assert json.loads(withdrawn["data"])["patient_id"] == patient
