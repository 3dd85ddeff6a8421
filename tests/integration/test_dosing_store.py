"""Dosing's handlers, sweep and dose recording against the real database (both backends)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.dosing import commands, domain
from services.dosing.handlers import handlers
from services.dosing.holds import HOLDS_STREAM
from shared.auth import Principal
from shared.clock import FixedClock
from shared.consumer import Delivery
from shared.errors import ConcurrencyError, Refused
from shared.events import (
    ENROLLMENT,
    SAFETY,
    Arm,
    ArmAssigned,
    ArmCrossedOver,
    CloudEvent,
    EventData,
    InfusionGiven,
    PatientDosingHeld,
    PatientWithdrawn,
    SafetyHoldLifted,
)
from shared.protocol import default_protocol
from shared.store import EventStore, Metadata, RecordedEvent, Transaction
from shared.web import Problem, problem_for

RANDOMIZED = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)
NURSE = Principal(sub="nurse-1", role="site_coordinator", site="S1")
PROTOCOL = default_protocol()
HANDLERS = handlers(PROTOCOL)


async def record_dose(store: EventStore, patient: str, who: Principal,
                      dose: domain.DoseCommand) -> list[EventData]:
    return await commands.record_dose(store, patient, who, dose, PROTOCOL, Metadata(actor=who.sub))


async def sweep_missed_visits(store: EventStore, clock: FixedClock) -> int:
    return await commands.sweep_missed_visits(store, clock, PROTOCOL)


def answered(error: BaseException) -> Problem:
    """What the API answers for a command's error (the web layer's one mapping)."""
    assert isinstance(error, Refused | ConcurrencyError), error
    return problem_for(error)


def delivered(payload: EventData, topic: str = ENROLLMENT) -> Delivery:
    event = CloudEvent(id=str(uuid.uuid4()), source="/services/test", type=payload.event_type(),
                       subject=payload.subject(), time=RANDOMIZED,
                       data=payload.model_dump(mode="json"), sequence=1, correlationid="corr-7")
    return Delivery(event, payload, topic)


async def handle(store: EventStore, payload: EventData, topic: str = ENROLLMENT) -> Delivery:
    delivery = delivered(payload, topic)
    async with store.transaction() as tx:
        await HANDLERS[payload.event_type()](tx, delivery)
    return delivery


async def assign(store: EventStore, arm: Arm) -> str:
    patient = f"PT-{uuid.uuid4().hex[:8]}"
    await handle(store, ArmAssigned(
        patient_id=patient, site_id="S1", arm=arm, randomization_number=1,
        stratum="S1:pasi_lt20", baseline_weight_kg=70.0, assigned_at=RANDOMIZED))
    return patient


def infusion(week: int, given_at: datetime) -> domain.RecordInfusion:
    return domain.RecordInfusion(
        infusion_id=str(uuid.uuid4()), week=week, given_at=given_at, weight_kg=70.0,
        cells_administered=70_000_000, lot_number="L-1", deviation_reason=None,
        now=given_at + timedelta(hours=1))


async def types(store: EventStore, stream: str) -> list[str]:
    return [e.type for e in await store.read_stream(stream)]


async def test_an_assignment_creates_one_calendar_however_often_delivered(
        store: EventStore) -> None:
    patient = await assign(store, "msc_high")
    assigned = ArmAssigned(patient_id=patient, site_id="S1", arm="msc_high",
                           randomization_number=1, stratum="S1:pasi_lt20",
                           baseline_weight_kg=70.0, assigned_at=RANDOMIZED)
    async with store.transaction() as tx:  # another copy of the assignment, as a new event
        await HANDLERS["ArmAssigned"](tx, delivered(assigned))
    (created,) = await store.read_stream(domain.schedule_stream(patient))
    assert created.type == "DosingScheduleCreated"
    assert created.data["visits"][1]["planned_cells"] == 210_000_000
    assert created.metadata["correlation_id"] == "corr-7"


async def test_missed_visits_are_recorded_once_however_many_sweeps_run(
        store: EventStore, database_url: str) -> None:
    infused, on_mtx = await assign(store, "msc_low"), await assign(store, "mtx")
    await record_dose(store, infused, NURSE, infusion(0, RANDOMIZED + timedelta(hours=2)))
    # 6 December: week 1's windows (to 5 December) have closed; week 0 was given for one.
    clock = FixedClock(datetime(2026, 12, 6, 0, 1, tzinfo=UTC))
    replicas = [EventStore(database_url) for _ in range(3)]
    try:
        found = [await sweep_missed_visits(store, clock)]
        found += await asyncio.gather(*(sweep_missed_visits(r, clock) for r in replicas))
        found.append(await sweep_missed_visits(store, clock))
        assert sum(found) == 3 and found[0] == 3
        missed = await _missed(store, infused) + await _missed(store, on_mtx)
        assert sorted((e.data["patient_id"] == infused, e.data["week"]) for e in missed) == [
            (False, 0), (False, 1), (True, 1)]
        assert all(e.metadata["actor"] == "dosing-sweep" for e in missed)

        clock.advance(timedelta(days=400))  # past every window
        for _ in range(2):
            await asyncio.gather(*(sweep_missed_visits(r, clock) for r in replicas))
    finally:
        for r in replicas:
            await r.close()
    assert sorted(e.data["week"] for e in await _missed(store, infused)) == [1, 2, 3, 5, 7]
    assert sorted(e.data["week"] for e in await _missed(store, on_mtx)) == list(range(16))


async def _missed(store: EventStore, patient: str) -> list[RecordedEvent]:
    return [e for e in await store.read_stream(domain.schedule_stream(patient))
            if e.type == "VisitMissed"]


async def test_a_consumed_hold_is_enforced_by_the_next_dose_and_a_lift_reenables_it(
        store: EventStore) -> None:
    held, other = await assign(store, "msc_low"), await assign(store, "msc_low")
    hold = await handle(store, PatientDosingHeld(hold_id="H-int-1", patient_id=held,
                                                 rule_id="R4-infusion-reaction"), SAFETY)
    with pytest.raises(Refused) as refused:
        await record_dose(store, held, NURSE, infusion(0, RANDOMIZED))
    assert (refused.value.code, refused.value.details["rule_id"]) == ("dosing_held",
                                                                      "R4-infusion-reaction")
    assert await types(store, domain.schedule_stream(held)) == ["DosingScheduleCreated"]
    given = await record_dose(store, other, NURSE, infusion(0, RANDOMIZED))
    assert given[0].event_type() == "InfusionGiven"

    lift = await handle(store, SafetyHoldLifted(
        hold_id="H-int-1", scope="patient", target=held, rationale="resolved",
        decided_by="dsmb-1"), SAFETY)
    given = await record_dose(store, held, NURSE, infusion(0, RANDOMIZED))
    assert given[0].event_type() == "InfusionGiven"
    holds = await store.read_stream(HOLDS_STREAM)
    assert [e.type for e in holds] == ["DosingHeld", "DosingResumed"]
    assert [e.metadata["causation_id"] for e in holds] == [hold.event.id, lift.event.id]
    assert holds[0].data == {"scope": "patient", "target": held, "rule_id":
                             "R4-infusion-reaction", "hold_id": "H-int-1", "product": "any",
                             "held_from": "2026-11-26T09:30:00Z"}  # safety's record time


async def test_two_replicas_posting_the_same_visit_record_one_dose(
        store: EventStore, database_url: str) -> None:
    patient = await assign(store, "msc_high")
    replicas = [EventStore(database_url) for _ in range(4)]
    command = domain.RecordInfusion(
        infusion_id="x", week=0, given_at=RANDOMIZED, weight_kg=70.0,
        cells_administered=210_000_000, lot_number="L-9", deviation_reason=None,
        now=RANDOMIZED + timedelta(hours=1))
    try:
        results = await asyncio.gather(
            *(record_dose(r, patient, NURSE, command) for r in replicas),
            return_exceptions=True)
    finally:
        for r in replicas:
            await r.close()
    recorded = [r for r in results if isinstance(r, list)]
    refused = [answered(r) for r in results if isinstance(r, BaseException)]
    assert len(recorded) == 1 and len(refused) == 3
    assert all(p.status == 409 and p.code in ("already_given", "conflict") for p in refused)
    assert (await types(store, domain.schedule_stream(patient))).count("InfusionGiven") == 1


async def test_withdrawal_cancels_and_crossover_replans(store: EventStore) -> None:
    leaving, crossing = await assign(store, "msc_low"), await assign(store, "mtx")
    await handle(store, PatientWithdrawn(patient_id=leaving, site_id="S1", reason="moved away",
                                         withdrawn_at=RANDOMIZED + timedelta(days=1)))
    stream = await store.read_stream(domain.schedule_stream(leaving))
    assert [e.type for e in stream] == ["DosingScheduleCreated", "VisitsCancelled"]
    assert len(stream[1].data["visits"]) == 6 + 8
    with pytest.raises(Refused) as refused:
        await record_dose(store, leaving, NURSE, infusion(0, RANDOMIZED))
    assert refused.value.code == "withdrawn"

    await handle(store, ArmCrossedOver(
        patient_id=crossing, site_id="S1", from_arm="mtx", to_arm="msc_high",
        reason="no response", crossed_over_at=RANDOMIZED + timedelta(days=2)))
    stream = await store.read_stream(domain.schedule_stream(crossing))
    assert [e.type for e in stream] == ["DosingScheduleCreated", "VisitsCancelled",
                                        "DosingScheduleCreated"]
    assert len(stream[1].data["visits"]) == 16
    assert stream[2].data["arm"] == "msc_high" and len(stream[2].data["visits"]) == 6
    given = await record_dose(store, crossing, NURSE, domain.RecordInfusion(
        infusion_id="y", week=0, given_at=RANDOMIZED + timedelta(days=2), weight_kg=70.0,
        cells_administered=210_000_000, lot_number="L-2", deviation_reason=None,
        now=RANDOMIZED + timedelta(days=3)))
    assert given[0].event_type() == "InfusionGiven"


async def test_a_dose_given_before_a_consumed_hold_is_recorded_as_a_late_entry(
        store: EventStore) -> None:
    """Defect 5, through the consumer and the store: the hold applies from safety's decision
    (the record's time), so a dose given an hour before it is recorded, marked late."""
    patient = await assign(store, "msc_low")
    await handle(store, PatientDosingHeld(hold_id="H-late", patient_id=patient,
                                          rule_id="R4-infusion-reaction"), SAFETY)
    with pytest.raises(Refused):
        await record_dose(store, patient, NURSE, infusion(0, RANDOMIZED + timedelta(minutes=1)))
    [given] = [e for e in await record_dose(store, patient, NURSE,
                                            infusion(0, RANDOMIZED - timedelta(hours=1)))
               if isinstance(e, InfusionGiven)]
    assert (given.late_entry, given.entered_after_hold) == (True, "H-late")


async def test_a_hold_committed_between_a_doses_reads_and_its_commit_is_enforced(
        store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race a store-wide lock used to close: the dose has read the holds (none), a hold
    commits, the dose commits. Its commit finds the holds stream moved, so the dose is decided
    again on the hold and refused: nothing of the first decision is written (D39)."""
    patient = await assign(store, "msc_low")
    read_stream = Transaction.read_stream
    held: list[str] = []

    async def hold_right_after_the_dose_reads(self: Transaction, stream_id: str,
                                              after_version: int = 0) -> list[RecordedEvent]:
        found = await read_stream(self, stream_id, after_version)
        if stream_id == HOLDS_STREAM and not held:
            held.append("H-race")  # before: the hold's own transaction reads the stream too
            await handle(store, PatientDosingHeld(
                hold_id="H-race", patient_id=patient, rule_id="R4-infusion-reaction"), SAFETY)
        return found

    monkeypatch.setattr(Transaction, "read_stream", hold_right_after_the_dose_reads)
    with pytest.raises(Refused) as refused:
        await record_dose(store, patient, NURSE, infusion(0, RANDOMIZED))
    assert held and refused.value.code == "dosing_held"
    assert await types(store, domain.schedule_stream(patient)) == ["DosingScheduleCreated"]
