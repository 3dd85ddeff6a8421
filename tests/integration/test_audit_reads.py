"""The audit ledger's reads on the real database: a patient's history read by stream only, the
same answer as the two reads it replaced, and the export's lines the same entries as the ledger's
pages, encoded once from the stored rows (issue 13, target 5)."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from services.audit import query
from services.audit.app import spec as audit_spec
from services.audit.domain import entry, history_order
from services.audit.export import CSV_COLUMNS, csv_line, csv_row, export_stream
from services.audit.query import Filters
from shared.app import Runtime, create_app
from shared.auth import issue_dev_token
from shared.migrate import upgrade
from shared.settings import Settings
from shared.store import EventFilter, EventStore, NewEvent

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def _meta(time: datetime, **more: Any) -> dict[str, Any]:
    return {"topic": "trial.enrollment", "source": "/services/randomization", "subject": "x",
            "time": time.isoformat(timespec="microseconds"), "actor": "inv-1",
            "role": "site_coordinator", "site": "S1", "correlation_id": str(uuid.uuid4()),
            **more}


def _event(type: str, data: dict[str, Any], time: datetime, event_id: str | None = None,
           **meta: Any) -> NewEvent:
    return NewEvent(type=type, data=data, metadata=_meta(time, **meta),
                    event_id=event_id or str(uuid.uuid4()))


async def _fill(store: EventStore, patients: list[str]) -> None:
    """Each patient: a screening in a stream of its own, an enrolment naming it, then events
    whose data carries reasons, text a line break or non-ASCII, a cause from a skewed clock;
    the patients' events interleaved, and a stranger's enrolment in between."""
    lives: list[list[tuple[str, NewEvent]]] = []
    for n, patient in enumerate(patients):
        screening = f"scr-{patient}"
        t = T0 + timedelta(minutes=n)
        assigned = str(uuid.uuid4())
        lives.append([
            (screening, _event("PatientScreened", {"screening_id": screening, "site_id": "S1",
                                                   "eligible": True, "notes": "a\nb"}, t)),
            (patient, _event("PatientEnrolled", {"patient_id": patient, "site_id": "S1",
                                                 "screening_id": screening,
                                                 "baseline_weight_kg": 70.0}, t + timedelta(1))),
            (patient, _event("ArmAssigned", {"patient_id": patient, "arm": "msc_high"},
                             t + timedelta(2), event_id=assigned)),
            # the clock of the dosing service runs behind: its effect still comes after
            (patient, _event("DosingScheduleCreated", {"patient_id": patient, "weeks": [0, 4]},
                             t + timedelta(1, 3600), causation_id=assigned)),
            (patient, _event("ProtocolDeviationRecorded",
                             {"patient_id": patient, "deviation_reason": "late by 2 days",
                              "site": "Zürich → Genève"}, t + timedelta(3))),
            (patient, _event("AssessmentCorrected", {"patient_id": patient,
                                                     "reason": {"code": "typo"},
                                                     "rationale": "transcription"},
                             t + timedelta(4))),
            (patient, _event("DosingHeld", {"patient_id": patient, "reason": "not this"},
                             t + timedelta(5), reason="the envelope's own")),
            (patient, _event("PatientWithdrawn", {"patient_id": patient, "reason": ""},
                             t + timedelta(6))),
        ])
    stranger = f"PT-{uuid.uuid4().hex[:8]}"
    lives.append([(stranger, _event("PatientEnrolled", {"patient_id": stranger,
                                                        "screening_id": f"scr-{stranger}"}, T0))])
    async with store.transaction() as tx:
        for i in range(max(len(life) for life in lives)):
            for life in lives:
                if i < len(life):
                    await tx.append(life[i][0], [life[i][1]], None)


async def _old_history(store: EventStore, patient_id: str) -> list[dict[str, Any]]:
    """The history as it was read before: the patient's enrolments by type, then the streams."""
    enrolled = await store.read_all(where=EventFilter(stream_ids=(patient_id,),
                                                      types=("PatientEnrolled",)), limit=None)
    screenings = [e.data["screening_id"] for e in enrolled if e.data.get("screening_id")]
    found = await store.read_all(where=EventFilter(stream_ids=(patient_id, *screenings)),
                                 limit=query.HISTORY_CAP)
    return history_order([entry(vars(e)) for e in found])


@pytest.fixture
async def ledger(make_database_url: Callable[[str], str]) -> AsyncIterator[EventStore]:
    url = make_database_url("ledger")
    await upgrade(url)
    store = EventStore(url)
    yield store
    await store.close()


async def test_a_patients_history_is_the_same_answer_read_by_stream_only(
        ledger: EventStore) -> None:
    patients = [f"PT-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    await _fill(ledger, patients)
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        statements.append(statement)

    sa.event.listen(ledger.read_engine.sync_engine, "before_cursor_execute", seen)
    try:
        for patient in patients:
            old = await _old_history(ledger, patient)
            statements.clear()
            new = await query.patient_history(ledger, patient)
            as_json = [json.loads(text)
                       for text in await query.patient_history_json(ledger, patient)]
            # Every read is by stream: none asks for a type (the planner would take its index).
            reads = [s.split("WHERE", 1)[1] for s in statements if "WHERE" in s]
            assert reads and not [r for r in reads if "type" in r], reads
            assert new == old
            assert as_json == old
            assert [e["type"] for e in new] == [
                "PatientScreened", "PatientEnrolled", "ArmAssigned", "DosingScheduleCreated",
                "ProtocolDeviationRecorded", "AssessmentCorrected", "DosingHeld",
                "PatientWithdrawn"]
            assert [e["reason"] for e in new][4:] == [
                "late by 2 days", "transcription", "the envelope's own", None]
            assert new[0]["data"]["notes"] == "a\nb"
            assert new[4]["data"]["site"] == "Zürich → Genève"
    finally:
        sa.event.remove(ledger.read_engine.sync_engine, "before_cursor_execute", seen)
    assert await query.patient_history(ledger, "PT-nobody") == []
    assert await query.patient_history_json(ledger, "PT-nobody") == []


async def test_a_history_over_the_cap_keeps_the_first_entries_in_ledger_order(
        ledger: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    patients = [f"PT-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    await _fill(ledger, patients)
    monkeypatch.setattr(query, "HISTORY_CAP", 5)
    for patient in patients:
        old = await _old_history(ledger, patient)
        assert len(old) == 5
        assert await query.patient_history(ledger, patient) == old
        assert [json.loads(t) for t in await query.patient_history_json(ledger, patient)] == old


async def _export(store: EventStore, filters: Filters, fmt: str) -> str:
    return b"".join([chunk async for chunk in export_stream(store, filters, fmt)]).decode()


async def test_the_export_lines_are_the_ledgers_entries(
        ledger: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    patients = [f"PT-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    await _fill(ledger, patients)
    monkeypatch.setattr("services.audit.export.BATCH", 7)  # several pages
    everything = [entry(vars(e)) for e in await ledger.read_all(limit=None)]
    assert len(everything) == 4 * 8 + 1
    for filters in (Filters(), Filters(patient_id=patients[1]),
                    Filters(type="DosingHeld", actor="inv-1")):
        expected = [entry(vars(e)) for e in await ledger.read_all(where=filters.where(),
                                                                  limit=None)]
        text = await _export(ledger, filters, "ndjson")
        assert text.endswith("\n") or not expected
        lines = text.split("\n")[:-1]
        assert [json.loads(line) for line in lines] == expected
        # Compact lines, the fields in the entry's order, the data embedded as stored.
        assert all(line.startswith('{"position":') for line in lines)
        assert [list(json.loads(line)) for line in lines] == [list(e) for e in expected]
        rows = list(csv.reader(io.StringIO(await _export(ledger, filters, "csv"))))
        assert rows[0] == list(CSV_COLUMNS)
        old_csv = csv_line(list(CSV_COLUMNS)) + "".join(csv_line(csv_row(e)) for e in expected)
        assert await _export(ledger, filters, "csv") == old_csv
    assert len((await _export(ledger, Filters(), "ndjson")).splitlines()) == len(everything)


async def test_the_history_route_answers_the_same_json(ledger: EventStore) -> None:
    patients = [f"PT-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    await _fill(ledger, patients)
    settings = Settings(service_name="audit", database_url=ledger.url, relay_enabled=False,
                        consumers_enabled=False, jwt_secret="audit-" + "s" * 40)
    app = create_app(audit_spec, settings)
    app.state.runtime = Runtime(audit_spec, settings)  # no lifespan: nothing runs in background
    headers = {"Authorization": f"Bearer {issue_dev_token(settings.jwt_secret, 'dsmb')}"}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://audit", headers=headers) as client:
            for patient in patients:
                expected = await _old_history(ledger, patient)  # before this read is filed
                r = await client.get(f"/v1/audit/patients/{patient}/history")
                assert r.status_code == 200
                assert r.headers["content-type"] == "application/json"
                assert r.json() == {"patient_id": patient,
                                    "order": "source time; a cause always before its effects",
                                    "items": expected}
                # The DSMB's read is itself in the ledger now, under the patient (D50).
                views = [e for e in await ledger.read_stream(patient)
                         if e.type == "PatientDataViewed"]
                assert [(v.metadata["role"], v.data["route"]) for v in views] == [
                    ("dsmb", "/v1/audit/patients/{patient_id}/history")]
            r = await client.get("/v1/audit/patients/PT-nobody/history")
            assert (r.status_code, r.json()["code"]) == (404, "patient_not_found")
            r = await client.get(f"/v1/audit/patients/{patients[0]}/history", headers={
                "Authorization": f"Bearer {issue_dev_token(settings.jwt_secret, 'pharmacist', 'S1')}"})
            assert (r.status_code, r.json()["code"]) == (403, "forbidden")
            r = await client.get("/v1/audit/export", params={"patient_id": patients[0]})
            assert r.headers["content-type"].startswith("application/x-ndjson")
            assert [json.loads(line) for line in r.text.splitlines()] == [
                entry(vars(e)) for e in await ledger.read_stream(patients[0])]
    finally:
        await app.state.runtime.store.close()


async def test_a_read_narrowed_to_a_patient_by_its_query_is_filed_as_a_view_of_that_patient(
        ledger: EventStore) -> None:
    """D50 for the reads that name their patient in the query rather than the path: FHIR's
    searches by `patient`, the audit's events and export filtered by `patient_id`. A read of no
    one in particular files nothing."""
    patients = [f"PT-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    settings = Settings(service_name="audit", database_url=ledger.url, relay_enabled=False,
                        consumers_enabled=False, jwt_secret="audit-" + "s" * 40)
    app = create_app(audit_spec, settings)
    app.state.runtime = Runtime(audit_spec, settings)
    headers = {"Authorization": f"Bearer {issue_dev_token(settings.jwt_secret, 'monitor')}"}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://audit", headers=headers) as client:
            # FHIR's searches first: `_fill`'s entries are not whole events for FHIR to read.
            for path in ("/v1/fhir/AdverseEvent", "/v1/fhir/ResearchSubject"):
                r = await client.get(path, params={"patient": patients[1]})
                assert r.status_code == 200, (path, r.text)
            await _fill(ledger, patients[:1])
            head = await ledger.head()
            r = await client.get("/v1/audit/events", params={"type": "PatientEnrolled"})
            assert r.status_code == 200 and len(r.json()["items"]) == 2  # a stranger too
            assert await ledger.head() == head  # no one's in particular: nothing filed
            for path, params in [("/v1/audit/events", {"patient_id": patients[0]}),
                                 ("/v1/audit/export", {"patient_id": patients[0]})]:
                r = await client.get(path, params=params)
                assert r.status_code == 200, (path, r.text)
        views = {p: [(v.metadata["role"], v.data["route"]) for v in await ledger.read_stream(p)
                     if v.type == "PatientDataViewed"] for p in patients}
        assert views == {
            patients[0]: [("monitor", "/v1/audit/events"), ("monitor", "/v1/audit/export")],
            patients[1]: [("monitor", "/v1/fhir/AdverseEvent"),
                          ("monitor", "/v1/fhir/ResearchSubject")]}
    finally:
        await app.state.runtime.store.close()
