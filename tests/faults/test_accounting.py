"""The accounting is not vacuous: given stores and a Kafka log with a lost write, duplicated
effects, a gap in the randomization numbers, a record published twice, a record the ledger or a
consumer missed, each check counts exactly those, and a clean system counts nothing.

Real stores (SQLite or PostgreSQL, migrated as the services migrate theirs), events appended as
the services append them; no process, no broker (the Kafka log is given as records).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from shared.migrate import upgrade
from shared.protocol import load_protocol
from shared.store import EventStore, NewEvent
from tests.faults.accounting import (
    KafkaRecord,
    duplicated_effects,
    kafka_check,
    ledger_check,
    lost_writes,
    processed_check,
    randomization_numbers,
)
from tests.faults.driver import Ack

STORES = ("randomization", "dosing", "safety", "efficacy", "audit")


@pytest.fixture
async def stores(make_database_url: Callable[[str], str]) -> AsyncIterator[dict[str, EventStore]]:
    opened = {}
    for name in STORES:
        url = make_database_url(name)
        await upgrade(url)
        opened[name] = EventStore(url)
    yield opened
    for store in opened.values():
        await store.close()


async def put(store: EventStore, stream: str, type_: str, data: dict[str, Any],
              event_id: str | None = None, **metadata: str) -> str:
    """Append one event in a transaction of its own; its id."""
    new = NewEvent(type=type_, data=data, metadata=metadata)
    if event_id is not None:
        new = NewEvent(type=type_, data=data, metadata=metadata, event_id=event_id)
    await store.append(stream, [new], None)
    return new.event_id


def ack(step: str, body: dict[str, Any]) -> Ack:
    return Ack(0, step, "/route", "/path", f"key-{step}", 201, body, "gw", 0.0, 1.0, 1, False)


async def patient(stores: dict[str, EventStore], n: int) -> None:
    """One patient's events as the services write them: screened, enrolled, assigned number n,
    dosed at week 0, an adverse event, a week-0 assessment."""
    rnd, p = stores["randomization"], f"P{n}"
    await put(rnd, f"s-{n}", "PatientScreened", {"screening_id": f"SCR{n}",
                                                 "screening_number": f"S1-{n}"})
    await put(rnd, f"patient-{p}", "PatientEnrolled", {"patient_id": p, "screening_id": f"SCR{n}"})
    await put(rnd, f"patient-{p}", "ArmAssigned", {"patient_id": p, "arm": "mtx",
                                                   "randomization_number": n})
    await put(stores["dosing"], p, "MethotrexateDoseGiven", {"patient_id": p, "week": 0,
                                                             "dose_id": f"D{n}"})
    await put(stores["safety"], p, "AdverseEventReported", {
        "adverse_event_id": f"AE{n}", "patient_id": p, "term": "headache", "onset_at": "t"})
    await put(stores["efficacy"], p, "AssessmentRecorded", {"assessment_id": f"A{n}",
                                                            "patient_id": p, "week": 0})


def acks_of(n: int) -> list[Ack]:
    p = f"P{n}"
    return [ack("screen", {"screening_id": f"SCR{n}"}), ack("enrol", {"patient_id": p}),
            ack("randomize", {"patient_id": p, "arm": "mtx", "randomization_number": n}),
            ack("dose", {"patient_id": p, "week": 0, "dose_id": f"D{n}"}),
            ack("adverse_event", {"adverse_event_id": f"AE{n}"}),
            ack("assessment", {"assessment_id": f"A{n}"})]


async def test_a_clean_run_counts_nothing(stores: dict[str, EventStore]) -> None:
    for n in (1, 2):
        await patient(stores, n)
    assert await lost_writes(stores, acks_of(1) + acks_of(2)) == []
    assert await duplicated_effects(stores) == []
    numbers = await randomization_numbers(stores["randomization"])
    assert (numbers.assigned, numbers.highest, numbers.gapless) == (2, 2, True)


async def test_lost_writes_are_counted(stores: dict[str, EventStore]) -> None:
    await patient(stores, 1)
    told = [ack("randomize", {"patient_id": "P1", "arm": "msc_low", "randomization_number": 1}),
            ack("screen", {"screening_id": "SCR9"}),
            ack("dose", {"patient_id": "P1", "week": 0, "dose_id": "D9"}),
            ack("assessment", {"assessment_id": "A9"})]
    lost = await lost_writes(stores, acks_of(1) + told)
    assert [x.step for x in lost] == ["randomize", "screen", "dose", "assessment"]


async def test_duplicated_effects_are_counted(stores: dict[str, EventStore]) -> None:
    await patient(stores, 1)
    await patient(stores, 2)
    rnd = stores["randomization"]
    await put(rnd, "s-1b", "PatientScreened", {"screening_id": "SCR1b", "screening_number": "S1-1"})
    await put(rnd, "patient-P1b", "PatientEnrolled", {"patient_id": "P1b", "screening_id": "SCR1"})
    await put(stores["dosing"], "P1", "MethotrexateDoseGiven", {"patient_id": "P1", "week": 0,
                                                                "dose_id": "D1b"})
    await put(stores["safety"], "P1", "AdverseEventReported", {
        "adverse_event_id": "AE1b", "patient_id": "P1", "term": "headache", "onset_at": "t"})
    # One record of another store applied twice by dosing's consumer: two commits.
    for _ in range(2):
        await put(stores["dosing"], "P2", "DosingScheduleCreated", {"patient_id": "P2"},
                  causation_id="assigned-elsewhere")
    # Effects of the store's own events (safety's rule firings) are not consumed events.
    own = await put(stores["safety"], "P2", "AdverseEventReported", {
        "adverse_event_id": "AE2b", "patient_id": "P2", "term": "rash", "onset_at": "t"})
    for _ in range(2):
        await put(stores["safety"], "P2", "StoppingRuleTriggered", {}, causation_id=own)
    found = [d.what for d in await duplicated_effects(stores)]
    expected = ("screening number S1-1", "enrolment of screening SCR1",
                "dose of (patient, week) ('P1', 0)", "adverse event report (patient, term, "
                "onset) ('P1', 'headache', 't')", "effects of consumed event assigned-elsewhere")
    assert len(found) == len(expected), found
    assert all(sum(w.startswith(e) for w in found) == 1 for e in expected), found


async def test_randomization_numbers_with_a_gap_and_a_repeat(
        stores: dict[str, EventStore]) -> None:
    for n in (1, 2, 4, 4):
        await put(stores["randomization"], f"patient-{n}", "ArmAssigned",
                  {"patient_id": f"P{n}", "randomization_number": n, "arm": "mtx"})
    numbers = await randomization_numbers(stores["randomization"])
    assert (numbers.gaps, numbers.repeated, numbers.gapless) == ([3], [4], False)


async def test_kafka_ledger_and_processed_marks_are_counted(
        stores: dict[str, EventStore]) -> None:
    rnd = stores["randomization"]
    ids = [await put(rnd, f"patient-P{n}", "ArmAssigned", {"patient_id": f"P{n}"})
           for n in range(3)]
    source = "/services/randomization"
    log = [KafkaRecord("trial.enrollment", 0, 0, ids[0], "ArmAssigned", source),
           KafkaRecord("trial.enrollment", 0, 1, ids[0], "ArmAssigned", source),  # twice
           KafkaRecord("trial.enrollment", 1, 0, ids[1], "ArmAssigned", source)]  # ids[2]: none
    kafka = await kafka_check(stores, log)
    assert (kafka.missing_count, kafka.duplicates, dict(kafka.duplicates_by_service)) == (
        1, {ids[0]: 2}, {"randomization": 1})
    ledger = stores["audit"]
    await put(ledger, "P0", "ArmAssigned", {}, event_id=ids[0], topic="trial.enrollment")
    await put(ledger, "P9", "ArmAssigned", {}, topic="trial.enrollment")  # never on Kafka
    await put(ledger, "protocol-audit", "ProtocolVersionActivated", {})  # its own: counted out
    check = await ledger_check(ledger, log)
    assert (check.missing, len(check.not_on_kafka), check.chain_ok) == ([ids[1]], 1, True)
    # The consumers: dosing handles ArmAssigned; it marked ids[0] only, plus one never on Kafka.
    async with stores["dosing"].transaction() as tx:
        await tx.mark_processed("dosing", ids[0], "trial.enrollment")
        await tx.mark_processed("dosing", "not-on-kafka", "trial.enrollment")
    marks = await processed_check(stores, log, load_protocol())
    assert (marks["dosing"].missing, marks["dosing"].extra) == ([ids[1]], ["not-on-kafka"])
    assert marks["randomization"].expected == 0  # it consumes no trial.enrollment
    # The ledger's entries are its marks (D89): ids[0] filed, ids[1] not; the entry never on
    # Kafka is extra, the ledger's own (the protocol version) is not counted.
    assert (marks["audit"].missing, len(marks["audit"].extra)) == ([ids[1]], 1)
