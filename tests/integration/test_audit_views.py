"""The reads made through the audit service reach trial.access, so a ledger rebuilt from the
topics holds them (D93): on the real database and broker, through the running audit app."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from services.audit.app import create_audit_app
from services.audit.commands import ledger_cloudevent, record
from services.audit.domain import AUDIT_SOURCE
from services.audit.views import ViewPublisher
from shared.auth import issue_dev_token
from shared.consumer import Delivery
from shared.events import ACCESS, ENROLLMENT, CloudEvent, PatientDataViewed, PatientWithdrawn
from shared.kafka import known_partitions, physical
from shared.migrate import upgrade
from shared.settings import Settings
from shared.store import EventStore, RecordedEvent, utcnow
from tests.support import eventually, read_topic
from tooling.operations import rebuild_ledger


def _cloud(source: str, data: PatientWithdrawn | PatientDataViewed, **envelope: str
           ) -> CloudEvent:
    return CloudEvent(id=str(uuid.uuid4()), source=source, type=data.event_type(),
                      subject=data.subject(), time=utcnow(), data=data.model_dump(mode="json"),
                      sequence=1, **envelope)


async def _records_on(bootstrap: str, topic: str) -> int:
    """How many records `topic` holds (its partitions' ends: a topic never truncated)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await known_partitions(consumer, topic)
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


async def _at_least(value: Awaitable[float], bound: int) -> bool:
    return await value >= bound


def _as_filed(entry: RecordedEvent) -> tuple[object, ...]:
    return entry.stream_id, entry.event_id, entry.type, entry.data, entry.metadata


async def test_the_reads_made_through_the_audit_service_survive_a_rebuild_from_the_topics(
        settings: Settings, make_database_url: Callable[[str], str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}."  # topics of this test's own on the shared broker
    monkeypatch.setenv("TRIAL_KAFKA_TOPIC_PREFIX", prefix)  # for the rebuild's own settings
    audit = settings.model_copy(update={
        "service_name": "audit", "kafka_topic_prefix": prefix, "consumers_enabled": False,
        "audit_views_interval_s": 0.1})
    await upgrade(audit.database_url)
    patient = f"PT-{uuid.uuid4().hex[:8]}"
    # In the ledger already, from topics: a fact, and a monitor's read through dosing.
    fact = PatientWithdrawn(patient_id=patient, site_id="S1", reason="moved away",
                            withdrawn_at=utcnow())
    elsewhere = PatientDataViewed(view_id=str(uuid.uuid4()), service="dosing",
                                  route="/v1/patients/{patient_id}/schedule",
                                  patient_id=patient, viewed_at=utcnow())
    ledger = EventStore(audit.database_url)
    try:
        async with ledger.transaction() as tx:
            await record(tx, Delivery(_cloud("/services/randomization", fact), fact, ENROLLMENT))
            await record(tx, Delivery(_cloud("/services/dosing", elsewhere, actor="mona",
                                             actorrole="monitor"), elsewhere, ACCESS))
        app = create_audit_app(audit)
        dsmb = issue_dev_token(audit.jwt_secret, "dsmb", None, "dora")
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://audit",
                headers={"Authorization": f"Bearer {dsmb}"}) as client:
            r = await client.get(f"/v1/audit/patients/{patient}/history")
            assert r.status_code == 200, r.text
            # The DSMB's read is in the ledger before the answer left (D50) ...
            (read,) = [e for e in await ledger.read_stream(patient)
                       if e.type == "PatientDataViewed" and e.metadata["source"] == AUDIT_SOURCE]
            assert (read.metadata["actor"], read.metadata["role"]) == ("dora", "dsmb")
            # ... and on trial.access soon after, as the envelope it was filed from; the read
            # through dosing, whose own relay publishes it, is not published again.
            records = await read_topic(audit.kafka_bootstrap_servers, physical(audit, ACCESS),
                                       lambda found: len(found) >= 1)
            published = [CloudEvent.from_bytes(r.value or b"") for r in records]
            assert published == [ledger_cloudevent(read.event_id, read.type, read.schema_version,
                                                   read.data, read.metadata)]
            assert records[0].key == published[0].subject.encode()


            async def through() -> float:  # its gauge: how far the ledger's reads are on the broker
                scraped = (await client.get("/metrics")).text.splitlines()
                (line,) = [m for m in scraped if m.startswith("trial_audit_views_published_thro")]
                return float(line.split()[1])

            await eventually(lambda: _at_least(through(), read.position), what="the gauge")
        # Once, and nothing else: the read through dosing is its relay's to publish.
        assert await _records_on(audit.kafka_bootstrap_servers, physical(audit, ACCESS)) == 1
        # The ledger reading it back files nothing again (each event id once, D89).
        head = await ledger.head()
        async with ledger.transaction() as tx:
            await record(tx, Delivery(published[0], published[0].typed_data(), ACCESS))
        assert await ledger.head() == head
        # Published once: the next pass finds nothing after its checkpoint.
        publisher = ViewPublisher(ledger, audit)
        try:
            assert await publisher.publish_once() == 0
        finally:
            await publisher.producer.drop()
        # A ledger rebuilt from trial.access holds the read, filed as the live ledger filed it.
        fresh = make_database_url("rebuilt")
        rebuilt = await rebuild_ledger(fresh, audit.kafka_bootstrap_servers, topics=[ACCESS])
        assert (rebuilt.filed, rebuilt.chain_ok) == (1, True)
        again = EventStore(fresh)
        try:
            assert [_as_filed(e) for e in await again.read_all(limit=None)] == [_as_filed(read)]
        finally:
            await again.close()
    finally:
        await ledger.close()


async def test_a_read_filed_while_the_broker_was_away_is_published_by_a_later_pass(
        settings: Settings) -> None:
    """A pass that cannot reach the broker moves no checkpoint, so the next publishes what it
    could not: each read at least once."""
    await upgrade(settings.database_url)
    away = settings.model_copy(update={"service_name": "audit",
                                       "kafka_topic_prefix": f"t{uuid.uuid4().hex[:8]}.",
                                       "kafka_bootstrap_servers": "127.0.0.1:1",
                                       "kafka_request_timeout_ms": 1000})
    here = away.model_copy(update={"kafka_bootstrap_servers": settings.kafka_bootstrap_servers})
    ledger = EventStore(settings.database_url)
    views = [PatientDataViewed(view_id=str(uuid.uuid4()), service="audit",
                               route="/v1/audit/patients/{patient_id}/history",
                               patient_id="PT-1", viewed_at=utcnow()) for _ in range(3)]
    try:
        async with ledger.transaction() as tx:
            for view in views:
                await record(tx, Delivery(_cloud(AUDIT_SOURCE, view, actor="dora",
                                                 actorrole="dsmb"), view, ACCESS))
        lost = ViewPublisher(ledger, away)
        with pytest.raises(Exception):  # noqa: B017 - whichever way the client gives up
            await lost.publish_once()
        await lost.producer.drop()
        publisher = ViewPublisher(ledger, here)
        try:
            assert await publisher.publish_once() == 3
        finally:
            await publisher.producer.drop()
        records = await read_topic(here.kafka_bootstrap_servers, physical(here, ACCESS),
                                   lambda found: len(found) >= 3)
        # Each keyed by its view (so spread over partitions; in ledger order within each).
        assert sorted(CloudEvent.from_bytes(r.value or b"").data["view_id"] for r in records
                      ) == sorted(v.view_id for v in views)
    finally:
        await ledger.close()
