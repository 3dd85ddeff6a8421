"""The audit ledger on the real database and broker: each event once through resends and
redeliveries, filed under its patient, and a row altered behind the triggers' back named."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import sqlalchemy as sa

from services.audit.app import spec as audit_spec
from services.audit.commands import record
from shared.app import Runtime, create_app
from shared.auth import issue_dev_token
from shared.consumer import ANY_TYPE, ConsumerRunner, Delivery
from shared.events import (
    ACCESS,
    LEDGER_TOPICS,
    PUBLISHERS,
    AccessDenied,
    DosingHeld,
    EventData,
    PatientEnrolled,
    PatientWithdrawn,
    StoppingRuleTriggered,
    parse_data,
)
from shared.migrate import upgrade
from shared.relay import Relay
from shared.schema import processed_events
from shared.settings import Settings
from shared.store import EventStore, Metadata, NewEvent, utcnow
from tests.conftest import Broker
from tests.support import eventually, tamper


def _facts(patient: str) -> list[EventData]:
    now = utcnow()
    return [
        PatientEnrolled(patient_id=patient, site_id="S1", screening_id=f"scr-{patient}",
                        baseline_weight_kg=70.0, baseline_pasi=14.0, enrolled_at=now),
        StoppingRuleTriggered(rule_id="R1", rule_set_version="1", scope="arm", target="msc_high",
                              evidence=("e-1",)),
        DosingHeld(scope="patient", target=patient, rule_id="R1", hold_id="h-1"),
        AccessDenied(access_id=str(uuid.uuid4()), service="dosing", method="POST",
                     path=f"/v1/patients/{patient}/infusions", status=403, code="forbidden",
                     patient_id=patient, denied_at=now),
        PatientWithdrawn(patient_id=patient, site_id="S1", reason="moved away", withdrawn_at=now),
    ]


OWNERS = ("randomization", "dosing", "safety")  # the services publishing `_facts`' topics


@pytest.fixture
async def stores(make_database_url: Callable[[str], str]
                 ) -> AsyncIterator[tuple[dict[str, EventStore], EventStore]]:
    """The publishing services' stores, and a ledger: each topic's records from its owner."""
    urls = {name: make_database_url(name) for name in (*OWNERS, "ledger")}
    for url in urls.values():
        await upgrade(url)
    made = {name: EventStore(url) for name, url in urls.items()}
    ledger = made.pop("ledger")
    yield made, ledger
    for store in (*made.values(), ledger):
        await store.close()


def _owner(fact: EventData) -> str:
    (source,) = PUBLISHERS[fact.topic] if fact.topic != ACCESS else ("/services/randomization",)
    return source.removeprefix("/services/")


async def _run_until(runner: ConsumerRunner, condition: Callable[[], object], what: str) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await eventually(condition, 120, what)
    finally:
        stop.set()
        await task


async def _processed(ledger: EventStore, group: str) -> set[str]:
    async with ledger.read_engine.connect() as conn:
        rows = await conn.execute(sa.select(processed_events.c.event_id).where(
            processed_events.c.consumer == group))
        return {r[0] for r in rows}


async def test_each_event_once_through_resends_redeliveries_and_a_new_group(
        own_broker: Broker, stores: tuple[dict[str, EventStore], EventStore]) -> None:
    sources, ledger = stores
    settings = Settings(service_name="randomization", kafka_bootstrap_servers=own_broker.bootstrap,
                        kafka_request_timeout_ms=5000, relay_poll_interval_s=0.1)
    patients = [f"PT-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    meta = Metadata(actor="inv-1", role="investigator", site="S1", correlation_id="req-1")
    for patient in patients:
        for fact in _facts(patient):
            await sources[_owner(fact)].append(f"s-{uuid.uuid4()}", [NewEvent.of(fact, meta)], 0)
    ours = {e.event_id for store in sources.values() for e in await store.read_all()}
    assert len(ours) == 15
    # The relays publish everything; a second relay resends it all. (A relay reads its own
    # records back from the broker before it publishes, D53, so it would not: this one acts out
    # a resend it could not see, the broker taking a batch after the relay read its tail.)
    for service, store in sources.items():
        for name in ("kafka", "kafka-resend"):
            relay = Relay(store, settings.model_copy(update={"service_name": service}), name=name)
            relay._resumed = name == "kafka-resend"
            while await relay.publish_pending():
                pass
            await relay.producer.drop()
            await relay.leadership.release()

    group = f"audit-{uuid.uuid4().hex[:6]}"
    first = ConsumerRunner(ledger, settings, list(LEDGER_TOPICS), {ANY_TYPE: record}, group_id=group)
    first.commit_offsets = False  # dies before committing offsets: everything comes again

    async def in_ledger() -> bool:
        return ours <= {e.event_id for e in await ledger.read_all(limit=10_000)}

    await _run_until(first, in_ledger, "the first delivery")
    # The ledger's entries are the consumer's processed marks (D89): none is written beside.
    assert await _processed(ledger, group) == set()
    again = ConsumerRunner(ledger, settings, list(LEDGER_TOPICS), {ANY_TYPE: record}, group_id=group)
    await _run_until(again, lambda: again.duplicates >= 30, "the redelivery of both copies")
    assert again.handled == 0
    # A new group (a rebuild's, `trial audit rebuild`) finds every id in the ledger all the same.
    fresh = f"audit-fresh-{uuid.uuid4().hex[:6]}"
    other = ConsumerRunner(ledger, settings, list(LEDGER_TOPICS), {ANY_TYPE: record}, group_id=fresh)
    await _run_until(other, lambda: other.duplicates >= 30, "the new group to see everything")
    assert other.handled == 0

    entries = await ledger.read_all(limit=10_000)
    assert Counter(e.event_id for e in entries if e.event_id in ours) == {i: 1 for i in ours}
    assert other.dead_lettered == again.dead_lettered == first.dead_lettered == 0
    assert (await ledger.verify()).ok
    for patient in patients:  # filed under the patient whatever the subject
        filed = await ledger.read_stream(patient)
        assert sorted(e.type for e in filed) == ["AccessDenied", "DosingHeld", "PatientEnrolled",
                                                 "PatientWithdrawn"]
        # Arrival order: across topics anything goes, within one topic the source's order.
        assert [e.type for e in filed if e.metadata["topic"] == "trial.enrollment"] == [
            "PatientEnrolled", "PatientWithdrawn"]
        assert all(e.metadata["actor"] == "inv-1" and e.metadata["correlation_id"] == "req-1"
                   and e.metadata["source"] == f"/services/{_owner(parse_data(e.type, e.data))}"
                   for e in filed)
        assert filed[-1].metadata["time"].endswith("+00:00")
    assert len(await ledger.read_stream("msc_high")) == 3  # the arm-wide rule, three times




async def test_a_ledger_row_altered_behind_the_triggers_back_is_reported_at_its_position(
        stores: tuple[dict[str, EventStore], EventStore], broker: Broker) -> None:
    sources, ledger = stores
    source = sources["randomization"]
    patient = f"PT-{uuid.uuid4().hex[:8]}"
    for fact in _facts(patient) * 2:
        recorded = (await source.append(f"s-{uuid.uuid4()}", [NewEvent.of(fact)], 0))[0]
        cloud = recorded.to_cloudevent("/services/test")
        async with ledger.transaction() as tx:
            await record(tx, Delivery(cloud, cloud.typed_data(), "trial.test"))
    settings = Settings(service_name="audit", database_url=ledger.url, relay_enabled=False,
                        consumers_enabled=False, jwt_secret="audit-" + "s" * 40,
                        kafka_bootstrap_servers=broker.bootstrap)
    app = create_app(audit_spec, settings)
    app.state.runtime = Runtime(audit_spec, settings)  # no lifespan: nothing runs in background
    headers = {"Authorization": f"Bearer {issue_dev_token(settings.jwt_secret, 'dsmb')}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://audit",
                                 headers=headers) as client:
        head = (await ledger.read_all(after=9))[0].hash
        named = {"ledger": (await ledger.read_all(limit=1))[0].hash,  # its hash at position 1
                 "pinned_ledger": None, "pinned_ledger_mismatch": False}  # not pinned here
        assert (await client.get("/v1/audit/verify")).json() == {
            "ok": True, "events_checked": 10, "first_broken_position": None,
            "head_position": 10, "head_hash": head,
            "anchors_checked": 0, "first_anchor_mismatch": None,  # no anchorer runs here
            "anchored_through": None, **named}
        await tamper(ledger, "UPDATE events SET metadata = '{\"actor\": \"nobody\"}' "
                              "WHERE position = 6")
        assert (await client.get("/v1/audit/verify")).json() == {
            "ok": False, "events_checked": 5, "first_broken_position": 6,
            "head_position": None, "head_hash": None,
            "anchors_checked": 0, "first_anchor_mismatch": None, "anchored_through": None,
            **named}
        r = await client.get("/v1/audit/verify", headers={
            "Authorization": f"Bearer {issue_dev_token(settings.jwt_secret, 'pharmacist', 'S1')}"})
        assert (r.status_code, r.json()["code"]) == (403, "forbidden")
    await app.state.runtime.store.close()
