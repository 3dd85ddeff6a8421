"""Benchmark: safety reaction latency, from an adverse event's commit to dosing refusing a dose.

    .venv/bin/python -m bench.safety_latency --backend embedded            # SQLite + Tansu
    .venv/bin/python -m bench.safety_latency --backend real                # PostgreSQL + Kafka

Starts a broker of its own and the safety and dosing services as processes (as `make run` does),
publishes one msc_high patient as randomization would, then runs N trials: report a grade 3
infusion reaction through the API (rule R4 holds the patient's infusions), and probe dosing every
few milliseconds with an infusion it would otherwise refuse as out of window (422, nothing
written) until it answers 409 `dosing_held`; then a DSMB decision lifts the hold and the next
trial waits for dosing to answer 422 again.

Two figures per trial: "refused" = first 409 received minus the AdverseEventReported's
recorded_at in the safety store (what a pharmacist would see, within the probe interval), and
"hold committed" = dosing's DosingHeld recorded_at minus the same (both clocks are this machine's).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer

from bench.system import fresh_databases, stop_infrastructure
from deploy import infra
from shared.auth import issue_dev_token
from shared.events import ArmAssigned, CloudEvent, EventData, PatientEnrolled
from shared.kafka import client_options, physical
from shared.settings import SERVICES as ALL_SERVICES
from shared.settings import Settings
from shared.store import EventStore, utcnow
from tooling.launcher import System

SECRET = "bench-" + uuid.uuid4().hex
SERVICES = ("safety", "dosing")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def publish_patient(bootstrap: str, patient_id: str) -> None:
    now = utcnow()
    events: list[EventData] = [
        PatientEnrolled(patient_id=patient_id, site_id="S1", screening_id=str(uuid.uuid4()),
                        baseline_weight_kg=70.0, baseline_pasi=14.0, enrolled_at=now),
        ArmAssigned(patient_id=patient_id, site_id="S1", arm="msc_high", randomization_number=1,
                    stratum="S1:pasi_lt20", baseline_weight_kg=70.0, assigned_at=now)]
    settings = Settings(kafka_bootstrap_servers=bootstrap)  # the environment's topic prefix
    producer = AIOKafkaProducer(**client_options(settings), acks="all")
    await producer.start()
    try:
        for data in events:
            # As randomization publishes them: a consumer takes a topic's records only from
            # the service that owns it (a record from anyone else goes to the DLQ, D52).
            ce = CloudEvent(id=str(uuid.uuid4()), source="/services/randomization",
                            type=data.event_type(),
                            subject=patient_id, time=now, data=data.model_dump(mode="json"),
                            sequence=1)
            await producer.send_and_wait(physical(settings, data.topic), ce.to_bytes(),
                                         key=patient_id.encode())
    finally:
        await producer.stop()


async def until(check: object, timeout: float = 120.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert callable(check)
        if await check():
            return
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(interval)


async def run(system: System, urls: dict[str, str], trials: int, probe_s: float
              ) -> dict[str, list[float]]:
    patient = f"PT-BENCH{uuid.uuid4().hex[:6].upper()}"
    await publish_patient(system.bootstrap, patient)
    site_h = {"Authorization": f"Bearer {issue_dev_token(SECRET, 'site_coordinator', 'S1')}"}
    dsmb_h = {"Authorization": f"Bearer {issue_dev_token(SECRET, 'dsmb')}"}
    safety_store, dosing_store = EventStore(urls["safety"]), EventStore(urls["dosing"])
    probe_body = {"week": 7, "weight_kg": 70.0, "cells_administered": 210_000_000,
                  "lot_number": "L-1"}
    refused: list[float] = []
    committed: list[float] = []
    async with httpx.AsyncClient(base_url=system.url("safety"), headers=site_h, timeout=30) as safety, \
            httpx.AsyncClient(base_url=system.url("safety"), headers=dsmb_h, timeout=30) as dsmb, \
            httpx.AsyncClient(base_url=system.url("dosing"), headers=site_h, timeout=30) as dosing:

        async def probe() -> int:
            r = await dosing.post(f"/v1/patients/{patient}/infusions",
                                  json={**probe_body, "given_at": utcnow().isoformat()})
            return r.status_code

        async def known() -> bool:
            r = await safety.post(f"/v1/patients/{patient}/lab-results", json={
                "collected_at": utcnow().isoformat(),
                "results": [{"analyte": "WBC", "value": 6.0, "unit": "10^9/L"}]})
            return r.status_code == 201 and await probe() == 422

        await until(known)
        for i in range(trials):
            r = await safety.post(f"/v1/patients/{patient}/adverse-events", json={
                "term": "infusion related reaction", "onset_at": utcnow().isoformat(),
                "ctcae_grade": 3, "serious": False, "relatedness": "not_related",
                "expected": True, "infusion_related": True})
            assert r.status_code == 201 and r.json()["triggered_rules"] == [
                "R4-infusion-reaction"], r.text
            ae_id = r.json()["adverse_event_id"]
            while (status := await probe()) != 409:
                assert status == 422, status
                await asyncio.sleep(probe_s)
            seen = datetime.now(UTC)
            stream = await safety_store.read_stream(f"patient-{patient}")
            reported = next(e for e in stream if e.type == "AdverseEventReported"
                            and e.data["adverse_event_id"] == ae_id)
            hold = next(e for e in reversed(stream) if e.type == "PatientDosingHeld")
            held = next(e for e in await dosing_store.read_all(limit=100_000)
                        if e.type == "DosingHeld" and e.data["hold_id"] == hold.data["hold_id"])
            refused.append((seen - reported.recorded_at).total_seconds())
            committed.append((held.recorded_at - reported.recorded_at).total_seconds())
            r = await dsmb.post("/v1/safety/decisions", json={
                "scope": "patient", "target": patient, "decision": "resume",
                "hold_id": hold.data["hold_id"], "rationale": f"benchmark trial {i}: resume"})
            assert r.status_code == 201, r.text

            async def resumed() -> bool:
                return await probe() == 422

            await until(resumed, interval=probe_s)
    await safety_store.close()
    await dosing_store.close()
    return {"refused": refused, "hold committed": committed}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "real"], default="embedded")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--probe-ms", type=float, default=10.0)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-safety-"))
    port = infra.free_port()
    created: list[str] = []
    dsn = None
    if args.backend == "real":
        bootstrap = infra.start_kafka(port, state_dir=folder / "kafka")
        dsn = infra.start_postgres()
        urls = fresh_databases(dsn, SERVICES, created)
    else:
        bootstrap = infra.start_tansu(port, state_dir=folder / "tansu")
        urls = {s: f"sqlite+aiosqlite:///{folder / f'{s}.db'}" for s in SERVICES}
    system = System(bootstrap=bootstrap, database_urls=urls,
                    ports={s: infra.free_port() for s in ("gateway", *ALL_SERVICES)},
                    log_dir=folder / "logs", env={"TRIAL_JWT_SECRET": SECRET})
    try:
        system.start(SERVICES)
        system.wait_ready()
        results = asyncio.run(run(system, urls, args.trials, args.probe_ms / 1000))
    finally:
        system.stop()
        stop_infrastructure(args.backend, port, folder, dsn, created)
    for label, values in results.items():
        ms = [v * 1000 for v in values]
        print(f"backend={args.backend} trials={len(ms)} {label}: p50={statistics.median(ms):.0f} ms "
              f"p99={percentile(ms, 0.99):.0f} ms max={max(ms):.0f} ms")


if __name__ == "__main__":
    main()
