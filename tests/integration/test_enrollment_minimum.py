"""trial.enrollment carries the minimum (issue 14, D51): a screening that failed on HIV, relayed
to the real broker, reaches Kafka without its screening number and without its failing criteria,
while the randomization store keeps both and the service still answers the site from there."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import pytest
from aiokafka import ConsumerRecord

from services.randomization import commands
from shared.errors import Refused
from shared.events import ENROLLMENT, CloudEvent
from shared.relay import Relay
from shared.settings import Settings
from shared.store import EventStore
from shared.web import REFUSAL_STATUS
from tests.conftest import Broker
from tests.integration.test_randomization_store import COORDINATOR, META, PROTOCOL, facts
from tests.support import eventually, read_topic

HIV = "EXC-HIV-HBV-HCV"


async def test_a_screening_failed_on_hiv_is_published_without_its_number_or_criteria(
        settings: Settings, store: EventStore, broker: Broker) -> None:
    number = f"S1-HIV-{uuid.uuid4().hex[:8]}"
    failed = await commands.screen(store, replace(facts(14.2), screening_number=number, hiv=True),
                                   COORDINATOR, PROTOCOL, META)
    assert failed.eligible is False and [r.criterion for r in failed.reasons] == [HIV]
    eligible = await commands.screen(store, facts(14.2), COORDINATOR, PROTOCOL, META)
    patient = await commands.enrol(store, eligible.screening_id, COORDINATOR, PROTOCOL, META)

    relay = Relay(store, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    head = await store.head()
    try:
        await eventually(lambda: relay.published_position >= head, what="relay to publish")
    finally:
        stop.set()
        await task
    source = f"/services/{settings.service_name}"

    def ours(records: list[ConsumerRecord]) -> dict[str, ConsumerRecord]:
        found = {}
        for r in records:
            event = CloudEvent.from_bytes(r.value)
            if event.source == source:
                found[event.id] = r
        return found

    stored = {e.event_id: e for e in await store.read_all()}
    records = ours(await read_topic(broker.bootstrap, ENROLLMENT,
                                    until=lambda rs: set(ours(rs)) >= set(stored)))
    by_subject = {CloudEvent.from_bytes(r.value).subject: r for r in records.values()}

    # On Kafka: the failed screening says it failed, and neither which criterion nor whose.
    record = by_subject[failed.screening_id]
    wire = CloudEvent.from_bytes(record.value)
    assert wire.type == "PatientScreened" and wire.data["eligible"] is False
    assert wire.data.get("screening_number") is None and not wire.data.get("reasons")
    for secret in (number.encode(), HIV.encode(), b"HIV"):
        assert secret not in record.value, secret
        assert secret not in (record.key or b"") and all(secret not in v for _, v in record.headers)
    assert wire.typed_data().subject() == failed.screening_id  # still a valid PatientScreened
    # Every other event is published as stored.
    for event_id, r in records.items():
        if stored[event_id].type != "PatientScreened":
            assert CloudEvent.from_bytes(r.value).data == stored[event_id].data

    # The randomization store keeps the whole screening, and its hash chain holds.
    [kept] = await store.read_stream(commands.screening_stream(failed.screening_id))
    assert kept.data["screening_number"] == number
    assert [r["criterion"] for r in kept.data["reasons"]] == [HIV]
    assert (await store.verify()).ok
    # The service answers the site from its store: enrolling the failed screening is refused
    # with the failing criterion (what POST /v1/patients answers, 422 not_eligible).
    with pytest.raises(Refused) as refused:
        await commands.enrol(store, failed.screening_id, COORDINATOR, PROTOCOL, META)
    assert (REFUSAL_STATUS[refused.value.code], refused.value.code) == (422, "not_eligible")
    assert [r["criterion"] for r in refused.value.details["reasons"]] == [HIV]
    assert patient.patient_id is not None
