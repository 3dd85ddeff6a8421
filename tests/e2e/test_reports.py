"""What readers get from the ledger, through the gateway on a system of its own: SDTM domains that
reconcile with the ledger (CSV and SAS transport alike), FHIR R4 resources that validate, and
the DSMB report rendered in headless Chromium with nothing fetched but the page itself."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pyreadstat
import pytest
from fhir.resources.R4B.adverseevent import AdverseEvent
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.researchstudy import ResearchStudy
from fhir.resources.R4B.researchsubject import ResearchSubject

from deploy import infra
from services.audit import sdtm
from tests.e2e.conftest import client, screening, system_of_its_own, token
from tests.support import eventually
from tooling.launcher import System

CELLS_PER_KG = {"msc_low": 1_000_000, "msc_high": 3_000_000}
DISPOSITIONS = ("PatientWithdrawn", "TreatmentDiscontinued", "LostToFollowUp", "DeathRecorded",
                "StudyCompleted")
# A cohort of 6: mild and moderate adverse events (no stopping rule fires), doses, week-0
# assessments, a withdrawal and a treatment discontinuation.
ADVERSE_EVENTS = [(1, False, "Headache"), (2, False, "Fever"), (1, False, "Nausea"),
                  (3, True, "Alanine aminotransferase increased"), (2, False, "Fatigue")]


def now() -> str:
    return datetime.now(UTC).isoformat()


@pytest.fixture(scope="module")
def reports_system(pg_dsn: str | None, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[System]:
    with system_of_its_own(pg_dsn, tmp_path_factory.mktemp("reports")) as system:
        yield system


async def _patient(site: httpx.AsyncClient, site_id: str) -> tuple[str, str]:
    r = await site.post("/v1/screenings", json=screening(site_id, sex="male"))
    assert r.status_code == 201 and r.json()["eligible"], r.text
    r = await site.post("/v1/patients", json={"screening_id": r.json()["screening_id"]})
    assert r.status_code == 201, r.text
    patient = str(r.json()["patient_id"])
    r = await site.post(f"/v1/patients/{patient}/randomization")
    assert r.status_code == 201, r.text
    return patient, str(r.json()["arm"])


async def _dose(site: httpx.AsyncClient, patient: str, arm: str) -> None:
    async def given() -> bool:
        if arm == "mtx":
            r = await site.post(f"/v1/patients/{patient}/methotrexate-doses",
                                json={"week": 0, "dose_mg": 7.5, "given_at": now()})
        else:
            r = await site.post(f"/v1/patients/{patient}/infusions", json={
                "week": 0, "given_at": now(), "weight_kg": 70.0,
                "cells_administered": CELLS_PER_KG[arm] * 70, "lot_number": "L-1"})
        assert r.status_code in (201, 503), r.text  # 503: dosing still catching up
        return r.status_code == 201
    await eventually(given, what=f"a week-0 dose for {patient}")


@pytest.fixture(scope="module")
async def cohort(reports_system: System) -> AsyncIterator[dict[str, Any]]:
    system = reports_system
    async with client(system, "investigator", "S1") as s1, \
            client(system, "investigator", "S2") as s2, client(system, "monitor") as monitor:
        patients: list[tuple[str, str, httpx.AsyncClient]] = []
        for site, site_id in ((s1, "S1"), (s2, "S2"), (s1, "S1"), (s2, "S2"), (s1, "S1"),
                              (s1, "S1")):
            patient, arm = await _patient(site, site_id)
            patients.append((patient, arm, site))
        for patient, arm, site in patients[:5]:
            await _dose(site, patient, arm)
            r = await site.post(f"/v1/patients/{patient}/assessments", json={
                "week": 0, "assessed_at": now(), "pasi": {"total": 18.4}, "bsa_percent": 15.0,
                "dlqi": {"items": [2, 1, 1, 0, 2, 1, 0, 1, 1, 0]}, "spga": 3})
            assert r.status_code == 201, r.text
        for (patient, _, site), (grade, serious, term) in zip(patients, ADVERSE_EVENTS,
                                                              strict=False):
            r = await site.post(f"/v1/patients/{patient}/adverse-events", json={
                "term": term, "onset_at": now(), "ctcae_grade": grade, "serious": serious,
                "relatedness": "unlikely", "expected": True, "infusion_related": False})
            assert r.status_code == 201, r.text
        withdrawn, discontinued = patients[5], patients[4]
        r = await withdrawn[2].post(f"/v1/patients/{withdrawn[0]}/withdrawal",
                                    json={"reason": "moved away"})
        assert r.status_code == 200, r.text
        r = await discontinued[2].post(
            f"/v1/patients/{discontinued[0]}/treatment-discontinuation",
            json={"reason": "intolerance"})
        assert r.status_code == 200, r.text

        async def ledger_has_it_all() -> bool:
            found = await _counts(monitor)
            return (found.get("AdverseEventReported") == len(ADVERSE_EVENTS)
                    and found.get("TreatmentDiscontinued") == 1
                    and found.get("PatientWithdrawn") == 1
                    and found.get("AssessmentRecorded") == 5
                    and found.get("FollowUpFactRecorded", 0) > 0)

        await eventually(ledger_has_it_all, 120, "the ledger to hold the cohort's events")
        yield {"patients": [p for p, _, _ in patients], "monitor": monitor}


async def _counts(monitor: httpx.AsyncClient) -> dict[str, int]:
    """How many of each event type the ledger holds."""
    found: dict[str, int] = {}
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = (await monitor.get("/v1/audit/events", params=params)).json()
        for item in page["items"]:
            found[item["type"]] = found.get(item["type"], 0) + 1
        cursor = page["next_cursor"]
        if cursor is None:
            return found


def _rows(text: str) -> tuple[list[str], list[dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text))
    return list(reader.fieldnames or []), list(reader)


async def test_sdtm_domains_reconcile_with_the_ledger_and_xpt_equals_csv(
        cohort: dict[str, Any], tmp_path: Path) -> None:
    monitor: httpx.AsyncClient = cohort["monitor"]
    counts = await _counts(monitor)
    metadata = (await monitor.get("/v1/exports/sdtm")).json()
    tables: dict[str, list[dict[str, str]]] = {}
    for domain in sdtm.DOMAINS:
        r = await monitor.get(f"/v1/exports/sdtm/{domain}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv"), r.text
        header, rows = _rows(r.text)
        variables = metadata["domains"][domain]["variables"]
        assert header == [v["name"] for v in variables]
        required = [v["name"] for v in variables if v["core"] == "Req"]
        assert set(required) <= set(header) and {"STUDYID", "DOMAIN", "USUBJID"} <= set(header)
        assert all(row["STUDYID"] == "NCT03424629" and row["DOMAIN"] == domain for row in rows)
        tables[domain] = rows
        # The same domain as SAS transport v5 reads back, with pyreadstat, as the CSV.
        x = await monitor.get(f"/v1/exports/sdtm/{domain}", params={"format": "xpt"})
        assert x.status_code == 200
        (tmp_path / f"{domain}.xpt").write_bytes(x.content)
        columns, meta = pyreadstat.read_xport(str(tmp_path / f"{domain}.xpt"),
                                              output_format="dict")
        assert meta.table_name == domain and list(columns) == header
        for i, row in enumerate(rows):
            for name in header:
                got = columns[name][i]
                if isinstance(got, float):
                    assert (row[name] == "" and got != got) or float(row[name]) == got, name
                else:
                    assert (got or "") == row[name], (domain, name)
    assert len(tables["AE"]) == counts["AdverseEventReported"] == len(ADVERSE_EVENTS)
    assert len(tables["EX"]) == counts.get("InfusionGiven", 0) + counts.get(
        "MethotrexateDoseGiven", 0) == 5
    disposition = [r for r in tables["DS"] if r["DSCAT"] == "DISPOSITION EVENT"]
    assert len(disposition) == sum(counts.get(t, 0) for t in DISPOSITIONS) == 2
    assert len(tables["DM"]) == counts["PatientEnrolled"] == 6
    assert {r["SEX"] for r in tables["DM"]} == {"M"}
    assert {r["AETOXGR"] for r in tables["AE"]} == {"1", "2", "3"}
    totals = [r for r in tables["QS"] if r["QSTESTCD"] == "PASITOT"]
    assert len(totals) == counts["AssessmentRecorded"] and {r["QSSTRESN"] for r in totals} == {
        "18.4"}


async def test_fhir_views_validate_and_round_trip(cohort: dict[str, Any]) -> None:
    monitor: httpx.AsyncClient = cohort["monitor"]
    r = await monitor.get("/v1/fhir/ResearchStudy/NCT03424629")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    study = ResearchStudy.model_validate(r.json())
    assert study.id == "NCT03424629" and len(study.arm or []) == 3
    assert (await monitor.get("/v1/fhir/ResearchStudy/NCT0000")).status_code == 404
    subjects = (await monitor.get("/v1/fhir/ResearchSubject")).json()
    bundle = Bundle.model_validate(subjects)
    assert bundle.type == "searchset" and bundle.total == len(cohort["patients"])
    for entry in subjects["entry"]:
        ResearchSubject.model_validate(entry["resource"])
    # A Bundle of the scripted cohort round-trips through the model and its JSON.
    again = Bundle.model_validate_json(bundle.model_dump_json()).model_dump(mode="json")
    assert again == bundle.model_dump(mode="json")
    one = cohort["patients"][5]
    found = (await monitor.get("/v1/fhir/ResearchSubject", params={"patient": one})).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [one]
    # Links as the caller reaches the system (the gateway), never the audit service's address.
    public = str(monitor.base_url).rstrip("/") + "/v1/fhir/"
    links = [link["url"] for link in found["link"]] + [e["fullUrl"] for e in found["entry"]]
    assert links and all(url.startswith(public) for url in links), links
    assert found["entry"][0]["resource"]["status"] == "off-study"  # withdrawn
    events = (await monitor.get("/v1/fhir/AdverseEvent")).json()
    assert Bundle.model_validate(events).total == len(ADVERSE_EVENTS)
    for entry in events["entry"]:
        AdverseEvent.model_validate(entry["resource"])
    r = await monitor.get("/v1/fhir/AdverseEvent", headers={"Authorization": "Bearer " + token(
        "site_coordinator", "S1")})
    assert r.status_code == 403  # exports are the monitors', the DSMB's and the admins'


async def test_the_dsmb_report_renders_in_chromium_offline_and_matches_the_safety_status(
        reports_system: System, cohort: dict[str, Any], tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    monitor: httpx.AsyncClient = cohort["monitor"]
    chromium = infra.ensure_chromium()
    url = f"{reports_system.url()}/v1/reports/dsmb"
    requests: list[str] = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(chromium), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = await browser.new_page(extra_http_headers={
                "Authorization": f"Bearer {token('dsmb')}"})
            page.on("request", lambda request: requests.append(request.url))
            # The report is drawn on request (matplotlib, the whole ledger folded): on a busy
            # two-core machine that can pass Playwright's 30 s default.
            answer = await page.goto(url, timeout=120_000)
            assert answer is not None and answer.status == 200
            await page.screenshot(path=str(tmp_path / "dsmb.png"), full_page=True)
            charts = await page.eval_on_selector_all(
                "figure svg", "els => els.map(e => [e.closest('figure').id, "
                "e.querySelectorAll('path, line, rect, polyline').length])")
            totals = await page.eval_on_selector_all(
                "[data-arm][data-ae-total]",
                "els => els.map(e => [e.dataset.arm, Number(e.dataset.aeTotal)])")
        finally:
            await browser.close()
    assert requests == [url]  # nothing else: no script, style, font or image from anywhere
    assert (tmp_path / "dsmb.png").stat().st_size > 10_000
    ids = {figure for figure, _ in charts}
    assert {"chart-enrolment", "chart-posterior", "chart-pasi75"} <= ids, charts
    assert all(marks > 0 for _, marks in charts), charts
    async with client(reports_system, "dsmb") as dsmb:
        status = (await dsmb.get("/v1/safety/status")).json()
    by_arm = {arm: body["adverse_events"] for arm, body in status["arms"].items()}
    page_totals = dict(totals)
    assert page_totals.pop("all") == len(ADVERSE_EVENTS) == (await _counts(monitor))[
        "AdverseEventReported"]
    # Per arm, the page says what GET /v1/safety/status says (one counting function).
    assert page_totals == by_arm and sum(by_arm.values()) == len(ADVERSE_EVENTS)


async def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True,
                                   timeout=120, check=False)


async def test_the_cli_writes_the_same_export_and_report_from_the_ledger(
        reports_system: System, cohort: dict[str, Any], tmp_path: Path) -> None:
    monitor: httpx.AsyncClient = cohort["monitor"]
    trial = str(Path(sys.executable).with_name("trial"))
    ledger = reports_system.database_urls["audit"]
    done = await _run(trial, "export-sdtm", ledger, "AE", "--out", str(tmp_path / "ae.csv"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ae.csv").read_bytes() == (await monitor.get("/v1/exports/sdtm/AE")).content
    assert json.loads((tmp_path / "metadata.json").read_text()) == (
        await monitor.get("/v1/exports/sdtm")).json()
    done = await _run(trial, "report-dsmb", ledger, "--out", str(tmp_path / "dsmb.html"))
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "dsmb.html").read_text()
    served = (await client(reports_system, "dsmb").get("/v1/reports/dsmb"))
    position = served.headers["x-ledger-position"]
    assert f'data-ledger-position="{position}"' in page and 'id="chart-posterior"' in page
    # The monitors' open report leaves the comparative interim safety data out (D35).
    open_page = (await monitor.get("/v1/reports/dsmb")).text
    assert 'id="chart-posterior"' not in open_page and 'id="chart-enrolment"' in open_page
