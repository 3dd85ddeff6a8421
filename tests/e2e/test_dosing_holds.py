"""Holds end to end: a PatientDosingHeld on trial.safety stops that patient's next dose at the
gateway, and no one else's; the DSMB's SafetyHoldLifted re-enables it."""

from __future__ import annotations

import uuid

from aiokafka import AIOKafkaProducer, ConsumerRecord

from shared.events import DOSING, SAFETY, CloudEvent, EventData, PatientDosingHeld, SafetyHoldLifted
from shared.store import utcnow
from tests.e2e.conftest import client
from tests.e2e.test_dosing_patients import INFUSION_ARMS, give, randomized_patient, schedule_of
from tests.support import read_topic
from tooling.launcher import System


async def publish_safety(bootstrap: str, payload: EventData) -> CloudEvent:
    """What the safety service would publish, written to trial.safety directly."""
    event = CloudEvent(id=str(uuid.uuid4()), source="/services/safety", type=payload.event_type(),
                       subject=payload.subject(), time=utcnow(),
                       data=payload.model_dump(mode="json"), sequence=1,
                       correlationid=f"corr-{uuid.uuid4().hex[:8]}", actor="safety-rules")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(SAFETY, event.to_bytes(), key=event.subject.encode())
    finally:
        await producer.stop()
    return event


def hold_for(patient_id: str) -> PatientDosingHeld:
    return PatientDosingHeld(hold_id=f"H-{uuid.uuid4().hex[:8]}", patient_id=patient_id,
                             rule_id="R4-infusion-reaction")


def lift(hold: PatientDosingHeld) -> SafetyHoldLifted:
    return SafetyHoldLifted(hold_id=hold.hold_id, scope="patient", target=hold.patient_id,
                            rationale="reaction resolved, reviewed by the DSMB",
                            decided_by="dsmb-chair")


async def test_a_patient_hold_stops_that_patients_next_infusion_until_lifted(
        system: System) -> None:
    async with client(system) as site:
        held, held_arm = await randomized_patient(site, INFUSION_ARMS)
        other, other_arm = await randomized_patient(site)
        for patient_id in (held, other):
            await schedule_of(site, patient_id)

        hold = hold_for(held)
        cause = await publish_safety(system.bootstrap, hold)
        calendar = await schedule_of(site, held, until=lambda s: s["holds"])
        assert calendar["holds"][0]["hold_id"] == hold.hold_id
        assert {v["status"] for v in calendar["visits"] if v["kind"] == "infusion"} == {"held"}

        r = await give(site, held, held_arm)
        assert r.status_code == 409, r.text
        assert r.json()["code"] == "dosing_held"
        assert (r.json()["rule_id"], r.json()["hold_id"]) == ("R4-infusion-reaction",
                                                              hold.hold_id)
        r = await give(site, other, other_arm)
        assert r.status_code == 201, r.text  # the hold is that patient's alone

        lifted = await publish_safety(system.bootstrap, lift(hold))
        await schedule_of(site, held, until=lambda s: not s["holds"])
        r = await give(site, held, held_arm)
        assert r.status_code == 201, r.text

        def both_published(records: list[ConsumerRecord]) -> bool:
            return {"DosingHeld", "DosingResumed"} <= {e.type for e in _holds(records, held)}

        records = await read_topic(system.bootstrap, DOSING, until=both_published, timeout=120)
        published = _holds(records, held)
        assert [e.type for e in published] == ["DosingHeld", "DosingResumed"]
        assert [e.causationid for e in published] == [cause.id, lifted.id]
        assert published[0].data["rule_id"] == "R4-infusion-reaction"
        assert published[0].correlationid == cause.correlationid


def _holds(records: list[ConsumerRecord], patient_id: str) -> list[CloudEvent]:
    events = [CloudEvent.from_bytes(r.value) for r in records]
    return [e for e in events if e.subject == patient_id and e.type.startswith("Dosing")
            and e.type != "DosingScheduleCreated" and e.type != "DosingScheduleReanchored"]
