"""The dosing app in-process on the real database and broker, its clock moved by the test: the
background sweep records and publishes each missed visit once; the API reads the same clock."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord

from services.dosing import domain
from services.dosing.app import create_dosing_app
from shared.auth import issue_dev_token
from shared.clock import FixedClock
from shared.events import (
    DOSING,
    ENROLLMENT,
    SAFETY,
    CloudEvent,
    EventData,
    PatientWithdrawn,
    TrialHalted,
)
from shared.kafka import client_options, ensure_topics
from shared.runtime import Runtime
from shared.settings import Settings
from shared.store import EventStore
from shared.sweep import Sweeper
from tests.integration.test_dosing_store import RANDOMIZED, assign
from tests.integration.test_randomization_store import cloud
from tests.support import eventually, read_topic


async def missed(store: EventStore, patient: str) -> list[int]:
    stream = await store.read_stream(domain.schedule_stream(patient))
    return [e.data["week"] for e in stream if e.type == "VisitMissed"]


async def test_the_apps_sweep_follows_its_clock_and_publishes_each_missed_visit_once(
        settings: Settings) -> None:
    clock = FixedClock(datetime(2026, 11, 27, 12, tzinfo=UTC))  # randomized the day before
    app = create_dosing_app(settings.model_copy(update={
        "dosing_sweep_interval_s": 0.05, "consumers_enabled": False}))
    app.state.clock = clock
    async with app.router.lifespan_context(app):
        store: EventStore = app.state.runtime.store
        sweeper: Sweeper = app.state.sweeper
        patient = await assign(store, "msc_low")

        async def passes_after(n: int) -> None:
            start = sweeper.passes
            await eventually(lambda: sweeper.passes >= start + n, what=f"{n} more sweeps")

        await passes_after(3)
        assert await missed(store, patient) == []  # every window is still open
        clock.advance(timedelta(days=9))  # 6 December: weeks 0 and 1 have closed
        async def two_missed() -> bool:
            return len(await missed(store, patient)) == 2

        await eventually(two_missed, what="the two missed visits")
        await passes_after(5)
        assert sorted(await missed(store, patient)) == [0, 1]

        token = issue_dev_token(settings.jwt_secret, "site_coordinator", "S1")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://dosing",
                                     headers={"Authorization": f"Bearer {token}"}) as api:
            calendar = (await api.get(f"/v1/patients/{patient}/schedule")).json()
            statuses = {v["week"]: v["status"] for v in calendar["visits"]
                        if v["kind"] == "infusion"}
            assert statuses == {0: "missed", 1: "missed", 2: "planned", 3: "planned",
                                5: "planned", 7: "planned"}
            body = {"week": 2, "weight_kg": 70.0, "cells_administered": 70_000_000,
                    "lot_number": "L-1", "given_at": "2026-12-10T10:00:00+00:00"}
            r = await api.post(f"/v1/patients/{patient}/infusions", json=body)
            assert (r.status_code, r.json()["code"]) == (422, "given_in_future")  # by the clock
            clock.advance(timedelta(days=4))
            r = await api.post(f"/v1/patients/{patient}/infusions", json=body)
            assert r.status_code == 201, r.text

        source = f"/services/{settings.service_name}"

        def published(records: list[ConsumerRecord]) -> list[CloudEvent]:
            events = [CloudEvent.from_bytes(r.value) for r in records]
            return [e for e in events if e.source == source and e.type == "VisitMissed"
                    and e.subject == patient]

        records = await read_topic(settings.kafka_bootstrap_servers, DOSING,
                                   until=lambda rs: len(published(rs)) >= 2, timeout=120)
        assert sorted(e.data["week"] for e in published(records)) == [0, 1]
        assert len({e.id for e in published(records)}) == 2



def _halt(patient: str) -> EventData:
    return TrialHalted(hold_id="H-73", trial_id="NCT03424629", rule_id="R1-death")


def _withdrawal(patient: str) -> EventData:
    return PatientWithdrawn(patient_id=patient, site_id="S1", reason="consent withdrawn",
                            withdrawn_at=RANDOMIZED)


@pytest.mark.parametrize(("forbids", "topic", "keyed", "refused"), [
    (_halt, SAFETY, False, "dosing_held"),
    (_withdrawal, ENROLLMENT, True, "withdrawn"),
], ids=["a trial halt on trial.safety", "a withdrawal on trial.enrollment"])
async def test_a_dose_waits_until_dosing_has_read_every_fact_already_on_the_broker_that_forbids_it(
        settings: Settings, forbids: Callable[[str], EventData], topic: str, keyed: bool,
        refused: str) -> None:
    """D73. A fact that forbids the dose (a hold safety published, whatever its key: a trial
    halt is keyed by the trial, not the patient; the patient's withdrawal) is on the broker
    before dosing has applied it (its consumer is behind, or wedged): the dose then is refused
    with 503 `not_caught_up`, never given. Dosing's consumer is held at the fact by the test;
    once it applies it, the dose is 409."""
    env = settings.model_copy(update={"kafka_topic_prefix": f"d73-{uuid.uuid4().hex[:8]}.",
                                      "service_name": "dosing", "dosing_sweep_interval_s": 3600})
    await ensure_topics(env)
    app = create_dosing_app(env)
    app.state.clock = FixedClock(RANDOMIZED + timedelta(hours=2))
    async with app.router.lifespan_context(app):
        rt: Runtime = app.state.runtime
        consumer = rt.consumer
        assert consumer is not None
        patient = await assign(rt.store, "msc_low")
        fact = forbids(patient)
        key = patient if keyed else None
        gate = asyncio.Event()
        apply = consumer.handlers[fact.event_type()]

        async def held_at_the_gate(tx: Any, delivery: Any) -> None:
            await gate.wait()
            await apply(tx, delivery)

        consumer.handlers[fact.event_type()] = held_at_the_gate
        await eventually(lambda: consumer.caught_up(topic, key, 0.2), timeout=60,
                         what=f"dosing reading {topic}")
        record = cloud(fact).model_copy(update={  # before the dose, from its publisher
            "time": RANDOMIZED, "source": f"/services/{'randomization' if keyed else 'safety'}"})
        producer = AIOKafkaProducer(**client_options(env))
        await producer.start()
        try:
            await producer.send_and_wait(env.kafka_topic_prefix + topic, record.to_bytes(),
                                         key=record.subject.encode())
        finally:
            await producer.stop()
        token = issue_dev_token(env.jwt_secret, "site_coordinator", "S1")
        body = {"week": 0, "weight_kg": 70.0, "cells_administered": 70_000_000,
                "lot_number": "L-1", "given_at": (RANDOMIZED + timedelta(hours=1)).isoformat()}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://dosing",
                                     headers={"Authorization": f"Bearer {token}"}) as api:
            r = await api.post(f"/v1/patients/{patient}/infusions", json=body)
            assert (r.status_code, r.json().get("code")) == (503, "not_caught_up"), r.text
            assert r.headers["Retry-After"] == "1"
            assert [e.type for e in await rt.store.read_stream(domain.schedule_stream(patient))
                    ].count("InfusionGiven") == 0
            gate.set()
            await eventually(lambda: consumer.caught_up(topic, key, 0.2),
                             what=f"dosing applying {fact.event_type()}")
            r = await api.post(f"/v1/patients/{patient}/infusions", json=body)
            assert (r.status_code, r.json().get("code")) == (409, refused), r.text
            if refused == "dosing_held":
                assert (r.json()["scope"], r.json()["hold_id"]) == ("trial", "H-73")
