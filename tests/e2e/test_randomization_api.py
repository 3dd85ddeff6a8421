"""Randomization through the gateway: eligibility, 100 concurrent randomizations, concealment,
crossover and site scoping, on a trial of this module's own.

The module starts its own broker and its own randomization service and gateway, with a protocol
copy (cap 200, so 100 patients fit; crossover enabled from week 0) and a secret it knows, so it
can regenerate the sequence as a statistician would. Its own broker also keeps other areas'
safety tests (which may halt the shared trial) from reaching it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import ConsumerRecord

from deploy import infra
from services.randomization.allocation import Slot, sequence
from shared.events import ENROLLMENT, CloudEvent
from shared.protocol import DEFAULT_PATH, load_protocol
from shared.store import EventStore
from tests.conftest import REAL, Broker
from tests.e2e.conftest import client, screening, start_system
from tests.support import read_topic
from tests.unit.test_randomization_eligibility import boundary_cases
from tooling.launcher import System

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Trial:
    """A running trial of a test module's own, and what a statistician would hold."""

    system: System
    broker: Broker
    secret: str
    protocol_dir: Path


# Sites of the test protocol besides S1 and S2: each test takes unused ones for fresh strata.
TEST_SITES = tuple(f"T{n:04d}" for n in range(400))
_unused_sites = iter(TEST_SITES)


def protocol_copy(folder: Path, cap: int, crossover: dict[str, Any] | None = None) -> Path:
    """A protocol version folder for a test: the built-in v1 with another cap (and crossover),
    and the test sites."""
    shutil.copytree(DEFAULT_PATH, folder)
    trial = json.loads((folder / "trial.json").read_text())
    sites = {**trial["sites"], **{s: {"name": f"Test site {s}", "time_zone": "Asia/Shanghai"}
                                  for s in TEST_SITES}}
    (folder / "trial.json").write_text(json.dumps({**trial, "enrollment_cap": cap,
                                                   "sites": sites}))
    if crossover is not None:
        section = json.loads((folder / "randomization.json").read_text())
        section["crossover"].update(crossover)
        (folder / "randomization.json").write_text(json.dumps(section))
    load_protocol(folder)  # the service would refuse to start on a bad copy
    return folder


@pytest.fixture(scope="module")
def own_trial_factory(pg_dsn: str | None, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[Any]:
    started: list[tuple[Trial, list[str]]] = []

    def start(cap: int, crossover: dict[str, Any] | None = None) -> Trial:
        folder = tmp_path_factory.mktemp("trial")
        broker = Broker("kafka" if REAL else "tansu", infra.free_port(), folder / "broker")
        broker.start()
        secret = "test-secret-" + uuid.uuid4().hex
        protocol_dir = protocol_copy(folder / "protocol", cap, crossover)
        system, created = start_system(
            broker, pg_dsn, folder, services=("randomization", "gateway"),
            env={"TRIAL_RANDOMIZATION_SECRET": secret, "TRIAL_PROTOCOL_DIR": str(protocol_dir),
                 "TRIAL_UPSTREAM_TIMEOUT_S": "120",
                 # Hundreds of requests in seconds from one test caller: not what the gateway's
                 # rate limit is tested by here.
                 "TRIAL_RATE_LIMIT_PER_S": "100000", "TRIAL_RATE_LIMIT_BURST": "100000"})
        trial = Trial(system, broker, secret, protocol_dir)
        started.append((trial, created))
        return trial

    yield start
    for trial, created in started:
        trial.system.stop()
        trial.broker.stop()
        for name in created:
            assert pg_dsn is not None
            infra.drop_database(pg_dsn, name)


@pytest.fixture(scope="module")
def trial(own_trial_factory: Any) -> Trial:
    started: Trial = own_trial_factory(200, {"enabled": True, "min_weeks_since_assignment": 0})
    return started


def fresh_site() -> str:
    """A site of its own gives a test fresh strata: their sequences start at slot 1."""
    return next(_unused_sites)


async def enrol(site: httpx.AsyncClient, site_id: str, pasi: float = 14.2) -> str:
    r = await site.post("/v1/screenings", json=screening(site_id, pasi=pasi))
    assert r.status_code == 201 and r.json()["eligible"], r.text
    r = await site.post("/v1/patients", json={"screening_id": r.json()["screening_id"]})
    assert r.status_code == 201, r.text
    patient_id: str = r.json()["patient_id"]
    return patient_id


def regenerate(trial: Trial, stratum: str, count: int) -> list[Slot]:
    """The statistician's offline check: `trial allocation-list`, with the secret."""
    out = subprocess.run(
        [sys.executable, "-m", "tooling.cli", "allocation-list", "--secret", trial.secret,
         "--stratum", stratum, "--count", str(count), "--protocol-dir", str(trial.protocol_dir),
         "--json"], cwd=REPO, capture_output=True, text=True, check=True, timeout=120).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    slots = [Slot(r["slot"], r["block"], r["block_size"], r["position"], r["arm"]) for r in rows]
    # The command and the service's own module agree (the module is what the service runs).
    secret = trial.secret.encode()
    assert slots == sequence(secret, load_protocol(trial.protocol_dir).randomization, stratum, count)
    return slots


async def enrollment_events(trial: Trial, done: Any) -> list[CloudEvent]:
    def until(records: list[ConsumerRecord]) -> bool:
        return bool(done([CloudEvent.from_bytes(r.value) for r in records]))

    records = await read_topic(trial.broker.bootstrap, ENROLLMENT, until=until, timeout=120)
    return [CloudEvent.from_bytes(r.value) for r in records]


# --- eligibility ------------------------------------------------------------------------------


def request_body(site_id: str, changes: dict[str, Any]) -> dict[str, object]:
    body = screening(site_id)
    for key, value in changes.items():
        if key == "consent_signed":
            body["consent_signed_at"] = "2026-01-01T09:00:00Z" if value else None
        elif isinstance(value, date):
            body[key] = value.isoformat()
        elif isinstance(value, tuple):
            body[key] = list(value)
        else:
            body[key] = value
    return body


async def test_every_criterion_at_its_boundary_through_the_gateway(trial: Trial) -> None:
    site_id = fresh_site()
    # Ages are counted in the site's own date (after 16:00 UTC, Shanghai's is tomorrow).
    today = load_protocol(trial.protocol_dir).site_date(site_id, datetime.now(UTC))
    cases = boundary_cases(today)
    async with client(trial.system, site=site_id) as site:
        answers = await asyncio.gather(*(
            site.post("/v1/screenings", json=request_body(site_id, changes))
            for _, changes, _ in cases))
        ids: dict[str, tuple[str, list[str]]] = {}
        for (name, _, expected), r in zip(cases, answers, strict=True):
            assert r.status_code == 201, (name, r.text)
            body = r.json()
            assert [x["criterion"] for x in body["reasons"]] == expected, name
            assert body["eligible"] is (not expected), name
            assert all(x["message"] for x in body["reasons"])
            ids[body["screening_id"]] = (name, expected)
        # An ineligible screening cannot be enrolled; the reasons come back, from the store.
        failed = next(sid for sid, (_, exp) in ids.items() if exp)
        r = await site.post("/v1/patients", json={"screening_id": failed})
        assert r.status_code == 422 and r.json()["code"] == "not_eligible"
        assert [x["criterion"] for x in r.json()["reasons"]] == ids[failed][1]
        assert r.headers["content-type"] == "application/problem+json"

    # Every screening is recorded as PatientScreened, eligible or not, with its reasons and
    # screening number in the randomization store; trial.enrollment carries neither (D51).
    events = await enrollment_events(trial, lambda es: set(ids) <= {e.subject for e in es})
    screened = {e.subject: e.data for e in events if e.type == "PatientScreened"}
    store = EventStore(trial.system.database_urls["randomization"])
    try:
        kept = {e.data["screening_id"]: e.data for e in await store.read_all(limit=100_000)
                if e.type == "PatientScreened"}
    finally:
        await store.close()
    for screening_id, (name, expected) in ids.items():
        data = screened[screening_id]
        assert data.get("screening_number") is None and not data.get("reasons"), name
        assert data["eligible"] is (not expected)
        assert data["protocol_version"] == "1.2.0"
        assert [x["criterion"] for x in kept[screening_id]["reasons"]] == expected, name
        assert kept[screening_id]["screening_number"], name


@pytest.mark.parametrize(("changes", "field"), [
    ({"birth_date": "2999-01-01"}, "birth_date"),
    ({"diagnosis_date": "2999-01-01"}, "diagnosis_date"),
    ({"diagnosis_date": "1970-01-01"}, "diagnosis_date"),  # before birth
    ({"consent_signed_at": "2999-01-01T00:00:00Z"}, "consent_signed_at"),
    ({"pasi": 80}, "body.pasi"),
    ({"psoriasis_type": "inverse"}, "body.psoriasis_type"),
    ({"nickname": "Jo"}, "body.nickname"),
])
async def test_impossible_screenings_are_refused_and_write_nothing(
        trial: Trial, changes: dict[str, object], field: str) -> None:
    async with client(trial.system) as site:
        r = await site.post("/v1/screenings", json=screening(**changes))  # type: ignore[arg-type]
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "validation_error"
    assert field in [e["field"] for e in r.json()["errors"]]


# --- 100 concurrent randomizations ------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body", "field"), [
    ("GET", "/v1/patients/%00", None, "path.patient_id"),
    ("POST", "/v1/patients/PT-%00/randomization", None, "path.patient_id"),
    ("POST", "/v1/patients", b'{"screening_id": "\\u0000"}', "body"),
])
async def test_a_nul_character_in_an_id_is_a_422_on_either_database(
        trial: Trial, method: str, path: str, body: bytes | None, field: str) -> None:
    """PostgreSQL's text cannot hold NUL: the lookup by such an id was a 500 there."""
    async with client(trial.system) as site:
        r = await site.request(method, path, content=body,
                               headers={"Content-Type": "application/json"} if body else {})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert [e["field"] for e in r.json()["errors"]] == [field]


async def test_100_concurrent_randomizations_are_gapless_and_balanced_per_block(
        trial: Trial) -> None:
    sites = [fresh_site(), fresh_site()]
    clients = {s: client(trial.system, site=s) for s in sites}
    gate = asyncio.Semaphore(16)

    async def enrol_one(n: int) -> tuple[str, str]:
        site_id = sites[n % 2]
        async with gate:
            return site_id, await enrol(clients[site_id], site_id, 14.2 if n % 4 < 2 else 25.0)

    try:
        patients = await asyncio.gather(*(enrol_one(n) for n in range(100)))
        answers = await asyncio.gather(*(
            clients[s].post(f"/v1/patients/{p}/randomization") for s, p in patients))
        assert [r.status_code for r in answers] == [201] * 100, [r.text for r in answers
                                                                if r.status_code != 201][:3]
        assigned = [r.json() for r in answers]
        # Each patient got one arm, and sees it on the patient record (read 16 at a time: the
        # reads are not what this test races).
        async def read(site_id: str, patient_id: str) -> httpx.Response:
            async with gate:
                return await clients[site_id].get(f"/v1/patients/{patient_id}")

        views = await asyncio.gather(*(read(s, p) for s, p in patients))
    finally:
        for c in clients.values():
            await c.aclose()
    assert {a["patient_id"] for a in assigned} == {p for _, p in patients}
    for a, view in zip(assigned, views, strict=True):
        assert view.status_code == 200, view.text
        assert (view.json()["arm"], view.json()["randomization_number"]) == (
            a["arm"], a["randomization_number"])
    # Unique, gapless numbers.
    numbers = sorted(a["randomization_number"] for a in assigned)
    assert numbers == list(range(numbers[0], numbers[0] + 100))
    # Per stratum, in number order: exactly the secret's sequence, every complete block balanced.
    by_stratum: dict[str, list[str]] = {}
    for a in sorted(assigned, key=lambda a: a["randomization_number"]):
        by_stratum.setdefault(a["stratum"], []).append(a["arm"])
    assert set(by_stratum) == {f"{s}:{b}" for s in sites for b in ("pasi_lt20", "pasi_ge20")}
    for stratum, arms in by_stratum.items():
        slots = regenerate(trial, stratum, len(arms))
        assert arms == [s.arm for s in slots], stratum
        blocks: dict[int, list[str]] = {}
        sizes = {slot.block_index: slot.block_size for slot in slots}
        for slot, arm in zip(slots, arms, strict=True):
            blocks.setdefault(slot.block_index, []).append(arm)
        complete = [b for i, b in blocks.items() if len(b) == sizes[i]]
        assert complete, stratum
        for b in complete:
            assert Counter(b) == Counter({arm: len(b) // 3 for arm in ("msc_low", "msc_high",
                                                                       "mtx")}), (stratum, b)


async def test_one_patient_randomized_10_times_concurrently_gets_one_assignment(
        trial: Trial) -> None:
    site_id = fresh_site()
    async with client(trial.system, site=site_id) as site:
        patient_id = await enrol(site, site_id)
        answers = await asyncio.gather(*(
            site.post(f"/v1/patients/{patient_id}/randomization") for _ in range(10)))
        assert sorted(r.status_code for r in answers) == [200] * 9 + [201]
        assert len({json.dumps(r.json(), sort_keys=True) for r in answers}) == 1
        # Withdrawal comes after, on the patient's partition: once it is read, all before it is.
        r = await site.post(f"/v1/patients/{patient_id}/withdrawal", json={"reason": "moved away"})
        assert r.status_code == 200 and r.json()["status"] == "withdrawn"
        again = await site.post(f"/v1/patients/{patient_id}/randomization")
        assert again.status_code == 200 and again.json() == answers[0].json()

    events = await enrollment_events(trial, lambda es: any(
        e.type == "PatientWithdrawn" and e.subject == patient_id for e in es))
    mine = [e for e in events if e.data.get("patient_id") == patient_id]
    assert [e.type for e in mine if e.type == "ArmAssigned"] == ["ArmAssigned"]
    assert [e.type for e in mine if e.type == "AllocationSlotUsed"] == ["AllocationSlotUsed"]
    assert next(e for e in mine if e.type == "PatientWithdrawn").reason == "moved away"


# --- concealment ------------------------------------------------------------------------------

ALLOCATION_WORDS = ("msc_low", "msc_high", "mtx", "block", "slot", "stratum", "sequence")


def normalised(value: Any, ids: set[str]) -> Any:
    """A response or event with its ids and times blanked: what is left must not differ."""
    if isinstance(value, dict):
        return {k: normalised(v, ids) for k, v in value.items()
                if k not in ("id", "time", "sequence", "correlationid")}
    if isinstance(value, list):
        return [normalised(v, ids) for v in value]
    if isinstance(value, str) and (value in ids or value[:4].isdigit()):
        return "<varies>"
    return value


def strings(value: Any) -> list[str]:
    """Every string value in a JSON document (keys left out)."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


async def test_nothing_before_assignment_predicts_the_next_arm(trial: Trial) -> None:
    # Two fresh strata whose first slots (known to us from the secret) hold different arms.
    site_a = fresh_site()
    first_a = regenerate(trial, f"{site_a}:pasi_lt20", 1)[0].arm
    site_b = next(s for s in (fresh_site() for _ in range(50))
                  if regenerate(trial, f"{s}:pasi_lt20", 1)[0].arm != first_a)
    seen: dict[str, dict[str, Any]] = {}
    for site_id in (site_a, site_b):
        async with client(trial.system, site=site_id) as site:
            r1 = await site.post("/v1/screenings", json=screening(site_id, number="SCR-1"))
            r2 = await site.post("/v1/patients", json={"screening_id": r1.json()["screening_id"]})
            patient_id = r2.json()["patient_id"]
            r3 = await site.get(f"/v1/patients/{patient_id}")
            seen[site_id] = {"ids": {r1.json()["screening_id"], patient_id, site_id},
                             "responses": [r1.json(), r2.json(), r3.json()],
                             "patient_id": patient_id, "screening_id": r1.json()["screening_id"]}
            assert set(r1.json()) == {"screening_id", "eligible", "reasons"}
            assert set(r2.json()) == {"patient_id", "site_id", "status"}
            assert r3.json()["arm"] is None and r3.json()["randomization_number"] is None
            assert r3.json()["stratum"] is None
    a, b = seen[site_a], seen[site_b]
    assert normalised(a["responses"], a["ids"]) == normalised(b["responses"], b["ids"])
    for s in (a, b):  # the patient record has arm and stratum fields, empty until assignment
        assert not any(w in v for v in strings(s["responses"]) for w in ALLOCATION_WORDS)

    # The events before assignment: the same (ids and times aside), nothing of the allocation.
    subjects = {a["screening_id"], a["patient_id"], b["screening_id"], b["patient_id"]}
    events = await enrollment_events(trial, lambda es: sum(
        e.subject in subjects for e in es) >= 4)
    events.sort(key=lambda e: e.sequence)  # two subjects, two partitions: order by position
    before = {site_id: [e.model_dump(mode="json") for e in events
                        if e.subject in (s["screening_id"], s["patient_id"])]
              for site_id, s in seen.items()}
    assert [e["type"] for e in before[site_a]] == ["PatientScreened", "PatientEnrolled"]
    assert normalised(before[site_a], a["ids"]) == normalised(before[site_b], b["ids"])
    for dumped in before[site_a]:
        assert not any(w in k for k in dumped["data"] for w in ALLOCATION_WORDS), dumped
        assert not any(w in v for v in strings(dumped) for w in ALLOCATION_WORDS), dumped

    # Assignment gives each its own slot's arm, and says nothing of the next one.
    for site_id, first in ((site_a, first_a), (site_b, None)):
        async with client(trial.system, site=site_id) as site:
            r = await site.post(f"/v1/patients/{seen[site_id]['patient_id']}/randomization")
        assert r.status_code == 201
        assert set(r.json()) == {"patient_id", "arm", "randomization_number", "stratum",
                                 "assigned_at"}
        assert first is None or r.json()["arm"] == first
    events = await enrollment_events(trial, lambda es: sum(
        e.type == "AllocationSlotUsed" and e.data["patient_id"] in (a["patient_id"],
                                                                    b["patient_id"]) for e in es) == 2)
    for e in events:
        if e.type == "AllocationSlotUsed" and e.data["patient_id"] == a["patient_id"]:
            assert set(e.data) == {"randomization_number", "stratum", "stratum_slot", "patient_id",
                                   "site_id", "pasi_band", "arm", "method", "sequence"}
            assert e.data["stratum_slot"] == 1 and e.data["arm"] == first_a
            assert e.data["sequence"] is None  # the stratum's own: no arm was suspended


# --- crossover and site scoping ---------------------------------------------------------------


async def test_an_investigator_crosses_an_mtx_patient_over(trial: Trial) -> None:
    site_id = fresh_site()
    slots = regenerate(trial, f"{site_id}:pasi_lt20", 6)
    first_mtx = next(s.slot for s in slots if s.arm == "mtx")
    async with client(trial.system, "investigator", site_id) as investigator, \
            client(trial.system, site=site_id) as coordinator, \
            client(trial.system, "investigator", "ELSEWHERE") as other_site:
        patients = [await enrol(coordinator, site_id) for _ in range(first_mtx)]
        arms = []
        for p in patients:
            r = await coordinator.post(f"/v1/patients/{p}/randomization")
            arms.append(r.json()["arm"])
        assert arms == [s.arm for s in slots[:first_mtx]]
        mtx_patient = patients[-1]
        body = {"to_arm": "msc_high", "reason": "no PASI 50 response at week 16"}

        r = await coordinator.post(f"/v1/patients/{mtx_patient}/crossover", json=body)
        assert (r.status_code, r.json()["code"]) == (403, "forbidden")
        r = await other_site.post(f"/v1/patients/{mtx_patient}/crossover", json=body)
        assert (r.status_code, r.json()["code"]) == (404, "patient_not_found")
        r = await investigator.post(f"/v1/patients/{mtx_patient}/crossover",
                                    json={"to_arm": "placebo", "reason": "x" * 5})
        assert r.status_code == 422 and r.json()["code"] == "validation_error"
        if first_mtx > 1:  # an msc patient: not a crossover the protocol allows
            r = await investigator.post(f"/v1/patients/{patients[0]}/crossover", json=body)
            assert (r.status_code, r.json()["code"]) in ((422, "crossover_not_allowed"),)

        r = await investigator.post(f"/v1/patients/{mtx_patient}/crossover", json=body)
        assert r.status_code == 200, r.text
        assert (r.json()["arm"], r.json()["assigned_arm"]) == ("msc_high", "mtx")
        r = await investigator.post(f"/v1/patients/{mtx_patient}/crossover", json=body)
        assert (r.status_code, r.json()["code"]) == (409, "already_crossed_over")
        view = (await coordinator.get(f"/v1/patients/{mtx_patient}")).json()
        assert view["arm"] == "msc_high" and view["crossovers"][0]["from_arm"] == "mtx"

    events = await enrollment_events(trial, lambda es: any(
        e.type == "ArmCrossedOver" and e.subject == mtx_patient for e in es))
    crossed = next(e for e in events if e.type == "ArmCrossedOver" and e.subject == mtx_patient)
    assert (crossed.data["from_arm"], crossed.data["to_arm"]) == ("mtx", "msc_high")
    assert crossed.reason == body["reason"] and crossed.actorrole == "investigator"


async def test_site_roles_act_on_and_see_only_their_own_site(trial: Trial) -> None:
    site_id = fresh_site()
    async with client(trial.system, site=site_id) as own, \
            client(trial.system, site="ELSEWHERE") as other, \
            client(trial.system, "pharmacist", site_id) as pharmacist, \
            client(trial.system, "monitor") as monitor:
        r = await other.post("/v1/screenings", json=screening(site_id))
        assert (r.status_code, r.json()["code"]) == (403, "forbidden")
        r = await pharmacist.post("/v1/screenings", json=screening(site_id))
        assert r.status_code == 403
        scr = (await own.post("/v1/screenings", json=screening(site_id))).json()["screening_id"]
        r = await other.post("/v1/patients", json={"screening_id": scr})
        assert (r.status_code, r.json()["code"]) == (404, "screening_not_found")
        patient_id = (await own.post("/v1/patients", json={"screening_id": scr})).json()[
            "patient_id"]
        for path in (f"/v1/patients/{patient_id}/randomization",):
            r = await other.post(path)
            assert (r.status_code, r.json()["code"]) == (404, "patient_not_found")
            assert (await pharmacist.post(path)).status_code == 403
            assert (await monitor.post(path)).status_code == 403
        r = await other.get(f"/v1/patients/{patient_id}")
        assert r.status_code == 404
        assert (await pharmacist.get(f"/v1/patients/{patient_id}")).status_code == 200
        assert (await monitor.get(f"/v1/patients/{patient_id}")).json()["status"] == "enrolled"
        r = await other.post(f"/v1/patients/{patient_id}/withdrawal", json={"reason": "moved"})
        assert r.status_code == 404
        r = await own.get("/v1/patients/PT-NOSUCHPATIENT")
        assert (r.status_code, r.json()["code"]) == (404, "patient_not_found")
        r = await own.post(f"/v1/patients/{patient_id}/randomization")
        assert r.status_code == 201
