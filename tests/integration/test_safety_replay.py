"""Safety over the real broker: facts arrive by Kafka, and replaying trial.safety into a fresh database
fires no rule twice and reproduces the same status."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import timedelta

from aiokafka import AIOKafkaProducer
from fastapi.encoders import jsonable_encoder

from services.safety import domain
from services.safety.handlers import handlers
from services.safety.projection import SAFETY_TYPES, current_state
from services.safety.state import firing_key
from shared.consumer import ConsumerRunner
from shared.events import PUBLISHERS, SAFETY
from shared.kafka import ensure_topics
from shared.migrate import upgrade
from shared.protocol import default_protocol
from shared.settings import Settings
from shared.store import EventStore, utcnow
from tests.conftest import Broker
from tests.integration.test_safety_support import (
    ae_body,
    cloud_event,
    patient_events,
    running_safety,
)
from tests.support import eventually


async def publish_patients(settings: Settings, arms: list[str]) -> list[str]:
    """Publish what randomization and dosing would about one dosed patient per arm given."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    ids = []
    try:
        for arm in arms:
            events = patient_events(arm, dosed_at=utcnow() - timedelta(hours=3))
            ids.append(events[0].subject())
            for data in events:
                # Each from its topic's owner: a consumer dead-letters anyone else's (D42).
                (owner,) = PUBLISHERS[data.topic]
                ce = cloud_event(data, source=owner)
                await producer.send_and_wait(data.topic, ce.to_bytes(), key=ce.subject.encode())
    finally:
        await producer.stop()
    return ids


async def safety_events(store: EventStore) -> list[str]:
    return [e.event_id for e in await store.read_all(limit=100_000) if e.type in SAFETY_TYPES]


async def status_of(store: EventStore) -> object:
    protocol = default_protocol()
    state = await current_state(store, protocol.trial_id)
    return jsonable_encoder(domain.status(protocol.safety, state, protocol.enrollment_cap))


async def consumed_all(consumer: ConsumerRunner | None, keys: list[str]) -> bool:
    """Whether the consumer has handled every record its topics hold about each of `keys`."""
    assert consumer is not None
    return all([await consumer.caught_up(topic, key, 1.0)
                for topic in consumer.topics for key in keys])


async def replay(settings: Settings, url: str, expected: int) -> ConsumerRunner:
    store = EventStore(url)
    runner = ConsumerRunner(store, settings, [SAFETY], handlers(default_protocol()),
                            group_id=f"replay-{uuid.uuid4().hex[:8]}")
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        async def caught_up() -> bool:
            return len(await safety_events(store)) >= expected and runner.records_seen >= expected

        await eventually(caught_up, timeout=120, what="the replay to catch up")
    finally:
        stop.set()
        await task
        await store.close()
    return runner


async def test_replaying_trial_safety_into_a_fresh_database_fires_no_rule_twice(
        own_broker: Broker, make_database_url: object) -> None:
    assert callable(make_database_url)
    settings = Settings(service_name="safety", database_url=make_database_url("safety"),
                        kafka_bootstrap_servers=own_broker.bootstrap, relay_poll_interval_s=0.1,
                        kafka_request_timeout_ms=5000)
    await ensure_topics(settings)
    async with running_safety(settings) as safety:
        arms = ["msc_high"] * 3 + ["msc_low"] * 2 + ["mtx"] * 2
        patients = await publish_patients(settings, arms)
        high, low, mtx = patients[0:3], patients[3:5], patients[5:7]
        async with safety.client() as site, safety.client("dsmb") as dsmb:
            async def all_dosed() -> bool:
                arms = (await dsmb.get("/v1/safety/status")).json()["arms"]
                dosed = [arms[a]["patients_dosed"] for a in ("msc_high", "msc_low", "mtx")]
                return dosed == [3, 2, 2]

            await eventually(all_dosed, timeout=120, what="facts to arrive by Kafka")
            # ...every one of them: the enrolments come on another topic than the doses, and
            # may still be on their way when the doses are counted
            await eventually(lambda: consumed_all(safety.runtime.consumer, patients),
                             timeout=120, what="the enrolment facts to arrive")
            r = await site.post(f"/v1/patients/{high[0]}/adverse-events",
                                json=ae_body(grade=4, relatedness="definite"))
            assert {"R2-related-grade4", "R6-bayes-toxicity"} <= set(r.json()["triggered_rules"])
            r = await site.post(f"/v1/patients/{low[0]}/adverse-events", json=ae_body(
                grade=2, serious=True, expected=False, relatedness="probable"))
            assert r.json()["triggered_rules"] == ["R5-susar"]
            ae_id = r.json()["adverse_event_id"]
            r = await site.post(f"/v1/patients/{low[0]}/adverse-events/{ae_id}/follow-ups",
                                json={"ctcae_grade": 3})
            # grade 3, 1 h after an infusion: an infusion reaction, and 1 of 2 dosed is toxic
            assert r.json()["triggered_rules"] == ["R4-infusion-reaction", "R6-bayes-toxicity"]
            r = await site.post(f"/v1/patients/{mtx[0]}/lab-results", json={
                "collected_at": utcnow().isoformat(),
                "results": [{"analyte": "platelets", "value": 80, "unit": "10^9/L"}]})
            assert r.json()["triggered_rules"] == ["R8-mtx-marrow"]
            r = await dsmb.post("/v1/safety/decisions", json={
                "scope": "arm", "target": "msc_high", "decision": "resume",
                "rationale": "Reviewed the case series; the arm may resume."})
            assert r.status_code == 201 and len(r.json()["lifted"]) == 2
            r = await site.post(f"/v1/patients/{high[1]}/adverse-events",
                                json=ae_body(grade=5, relatedness="not_related",
                                             serious=True, infusion_related=False))
            assert r.json()["triggered_rules"] == ["R1-death"]
        store = safety.runtime.store
        relay = safety.runtime.relay
        assert relay is not None

        async def published() -> bool:
            return relay.published_position >= await store.head()

        await eventually(published, timeout=120, what="the relay to publish everything")
        consumer = safety.runtime.consumer
        assert consumer is not None
        subjects = {e.payload().subject() for e in await store.read_all(limit=100_000)}
        await eventually(lambda: consumed_all(consumer, sorted(subjects | set(patients))),
                         timeout=120, what="the service to read every record about them")
        await eventually(published, timeout=120, what="the relay to publish everything")
        original = await safety_events(store)
        # its own events came back through trial.safety and changed nothing
        await eventually(lambda: consumer.duplicates + consumer.handled >= len(original),
                         timeout=120, what="the service to consume its own events")
        assert await safety_events(store) == original
        original_status = await status_of(store)
        async with safety.client("dsmb") as dsmb:
            over_http = (await dsmb.get("/v1/safety/status")).json()
        assert isinstance(original_status, dict)
        assert over_http["triggered_rules"] == [
            {**f, "at": over_http["triggered_rules"][i]["at"]}
            for i, f in enumerate(original_status["triggered_rules"])]

    fresh_url = make_database_url("fresh")
    await upgrade(fresh_url)
    await replay(settings, fresh_url, len(original))
    # ...and once more, as a second full redelivery into the same database
    again = await replay(settings, fresh_url, len(original))
    assert again.handled >= len(original)
    fresh = EventStore(fresh_url)
    try:
        replayed = await safety_events(fresh)
        assert sorted(replayed) == sorted(original)  # the same events, none added, none lost
        firings = [e for e in await fresh.read_all(limit=100_000)
                   if e.type == "StoppingRuleTriggered"]
        keys = Counter(firing_key(e.data["rule_id"], e.data["evidence"]) for e in firings)
        assert keys and max(keys.values()) == 1
        assert {e.data["rule_id"] for e in firings} == {
            "R1-death", "R2-related-grade4", "R4-infusion-reaction", "R5-susar",
            "R6-bayes-toxicity", "R8-mtx-marrow"}
        replayed_status = await status_of(fresh)
        assert replayed_status == original_status
        assert isinstance(replayed_status, dict)
        assert replayed_status["trial"]["status"] == "halted"
        assert replayed_status["arms"]["msc_high"]["status"] == "active"
    finally:
        await fresh.close()
