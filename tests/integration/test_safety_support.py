"""Helpers for the safety tests (no tests here): the service in process, patients it knows, bodies."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from fastapi import FastAPI

from services.safety.app import spec
from services.safety.commands import take_patient_fact
from shared.app import Runtime, create_app
from shared.auth import issue_dev_token
from shared.consumer import Delivery
from shared.events import (
    ArmAssigned,
    CloudEvent,
    EventData,
    InfusionGiven,
    MethotrexateDoseGiven,
    PatientEnrolled,
)
from shared.settings import Settings
from shared.store import utcnow


@dataclass
class SafetyService:
    app: FastAPI
    settings: Settings

    @property
    def runtime(self) -> Runtime:
        rt: Runtime = self.app.state.runtime
        return rt

    def client(self, role: str = "site_coordinator", site: str | None = "S1") -> httpx.AsyncClient:
        site = site if role in ("site_coordinator", "investigator", "pharmacist") else None
        token = issue_dev_token(self.settings.jwt_secret, role, site)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                 base_url="http://safety", timeout=30,
                                 headers={"Authorization": f"Bearer {token}"})


@asynccontextmanager
async def running_safety(settings: Settings) -> AsyncIterator[SafetyService]:
    app = create_app(spec, settings)
    async with app.router.lifespan_context(app):
        yield SafetyService(app, settings)


def cloud_event(data: EventData, source: str = "/services/test") -> CloudEvent:
    return CloudEvent(id=str(uuid.uuid4()), source=source, type=data.event_type(),
                      subject=data.subject(), time=utcnow(), data=data.model_dump(mode="json"),
                      sequence=1, correlationid=f"corr-{uuid.uuid4().hex[:8]}")


def patient_events(arm: str, site: str = "S1", dosed_at: datetime | None = None,
                   patient_id: str | None = None) -> list[EventData]:
    """What enrolment and dosing would publish about one patient."""
    pid = patient_id or f"PT-{uuid.uuid4().hex[:10].upper()}"
    now = utcnow()
    events: list[EventData] = [
        PatientEnrolled(patient_id=pid, site_id=site, screening_id=str(uuid.uuid4()),
                        baseline_weight_kg=70.0, baseline_pasi=14.0, enrolled_at=now),
        ArmAssigned.model_validate({"patient_id": pid, "site_id": site, "arm": arm,
                                    "randomization_number": 1, "stratum": f"{site}:pasi_lt20",
                                    "baseline_weight_kg": 70.0, "assigned_at": now})]
    if dosed_at is not None and arm == "mtx":
        events.append(MethotrexateDoseGiven(dose_id=str(uuid.uuid4()), patient_id=pid,
                                            site_id=site, week=0, dose_mg=7.5, given_at=dosed_at))
    elif dosed_at is not None:
        events.append(InfusionGiven.model_validate({
            "infusion_id": str(uuid.uuid4()), "patient_id": pid, "site_id": site, "arm": arm,
            "week": 0, "cells_administered": 210_000_000, "cells_per_kg": 3_000_000,
            "weight_kg": 70.0, "lot_number": "L-1", "given_at": dosed_at}))
    return events


async def seed_patient(service: SafetyService, arm: str, site: str = "S1",
                       dosed_hours_ago: float | None = 2.0) -> str:
    """Hand the safety consumer's handler a patient's events, as the consumer would."""
    dosed_at = None if dosed_hours_ago is None else utcnow() - timedelta(hours=dosed_hours_ago)
    events = patient_events(arm, site, dosed_at)
    for data in events:
        async with service.runtime.store.transaction() as tx:
            await take_patient_fact(tx, Delivery(cloud_event(data), data, data.topic),
                                    service.runtime.protocol)
    return events[0].subject()


def ae_body(grade: object = 2, relatedness: str = "possible", **overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "term": "fever", "onset_at": (utcnow() - timedelta(hours=1)).isoformat(),
        "ctcae_grade": grade, "serious": False, "relatedness": relatedness, "expected": True,
        "infusion_related": None}
    body.update(overrides)
    return body
