"""Randomization's service layer on the real database and broker: replicas share one gapless
allocation, a refused randomization writes nothing, and safety holds are consumed once."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import date
from typing import Any

import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer

from services.randomization import commands, domain
from services.randomization.allocation import sequence
from services.randomization.handlers import handlers
from shared.auth import Principal
from shared.commands import Session, Snapshot
from shared.consumer import ConsumerRunner
from shared.errors import Refused
from shared.events import (
    AllocationSlotUsed,
    CloudEvent,
    EnrollmentPaused,
    EventData,
    PatientDosingHeld,
    SafetyHoldLifted,
    dlq_topic,
)
from shared.kafka import ensure_topics
from shared.protocol import default_protocol
from shared.settings import Settings
from shared.store import ConcurrencyError, EventStore, Metadata, NewEvent, before_commit, utcnow
from shared.web import REFUSAL_STATUS
from tests.support import eventually

SECRET = b"integration-secret"
PROTOCOL = default_protocol()
COORDINATOR = Principal("coordinator-1", "site_coordinator", "S1")
META = Metadata(actor="coordinator-1", role="site_coordinator", site="S1")


def facts(pasi: float) -> domain.ScreeningFacts:
    return domain.ScreeningFacts(
        site_id="S1", screening_number=f"S1-{uuid.uuid4().hex[:6]}", birth_date=date(1980, 5, 1),
        sex="female", weight_kg=70.0, diagnosis_date=date(2020, 1, 15), psoriasis_type="plaque",
        pasi=pasi, bsa_percent=12.0, dlqi=11, conventional_therapy_failed=True,
        drug_induced=False, ongoing_psoriasis_treatment=False, prior_biologic_targets=(),
        active_infection=False, recurrent_infections=False, malignancy_history=False, hiv=False,
        hbv=False, hcv=False, pregnant_or_lactating=False, planning_pregnancy=False,
        can_attend_follow_up=True, consent_signed=True)


async def enrolled(store: EventStore, pasi: float = 14.2) -> str:
    screened = await commands.screen(store, facts(pasi), COORDINATOR, PROTOCOL, META)
    patient = await commands.enrol(store, screened.screening_id, COORDINATOR, PROTOCOL, META)
    assert patient.patient_id is not None
    return patient.patient_id


async def test_two_replicas_randomizing_at_once_share_one_gapless_balanced_sequence(
        store: EventStore, database_url: str) -> None:
    replica = EventStore(database_url)  # a second process's store on the same database
    try:
        patients = [await enrolled(store, 14.2 if n % 2 else 30.0) for n in range(24)]
        results = await asyncio.gather(*(
            commands.randomize((store, replica)[n % 2], p, COORDINATOR, PROTOCOL, SECRET, META)
            for n, p in enumerate(patients)))
    finally:
        await replica.close()
    assert all(r.created for r in results)
    numbers = sorted(r.assignment.randomization_number for r in results)
    assert numbers == list(range(1, 25))
    allocation = await store.read_stream(commands.ALLOCATION_STREAM)
    assert [e.data["randomization_number"] for e in allocation] == numbers
    by_stratum: dict[str, list[str]] = {}
    for event in allocation:
        by_stratum.setdefault(event.data["stratum"], []).append(event.data["arm"])
        assert event.data["stratum_slot"] == len(by_stratum[event.data["stratum"]])
    for stratum, arms in by_stratum.items():
        assert arms == [s.arm for s in sequence(SECRET, PROTOCOL.randomization, stratum,
                                                len(arms))]
    assert Counter(r.assignment.patient_id for r in results) == Counter(patients)
    assert (await store.verify()).ok


async def test_a_refused_randomization_writes_nothing(store: EventStore) -> None:
    patient_id = await enrolled(store)
    await commands.withdraw(store, patient_id, "moved away", COORDINATOR, PROTOCOL, META)
    head = await store.head()
    with pytest.raises(Refused) as refused:
        await commands.randomize(store, patient_id, COORDINATOR, PROTOCOL, SECRET, META)
    assert (REFUSAL_STATUS[refused.value.code], refused.value.code) == (409, "withdrawn")
    other_site = Principal("coordinator-2", "site_coordinator", "S2")
    with pytest.raises(Refused) as hidden:
        await commands.randomize(store, patient_id, other_site, PROTOCOL, SECRET, META)
    assert (REFUSAL_STATUS[hidden.value.code], hidden.value.code) == (404, "patient_not_found")
    assert await store.head() == head


def cloud(data: EventData) -> CloudEvent:
    return CloudEvent(id=str(uuid.uuid4()), source="/services/safety", type=data.event_type(),
                      subject=data.subject(), time=utcnow(), data=data.model_dump(mode="json"),
                      sequence=1, correlationid="corr-1")


async def test_safety_holds_are_consumed_once_and_patient_holds_ignored(
        settings: Settings, store: EventStore) -> None:
    topic = f"test.safety.{uuid.uuid4().hex[:8]}"  # the session broker's trial.safety is shared
    await ensure_topics(settings, [topic, dlq_topic(topic)])
    pause = cloud(EnrollmentPaused(hold_id="h-1", trial_id="NCT03424629", rule_id="R5-susar"))
    lift = cloud(SafetyHoldLifted(hold_id="h-1", scope="trial", target="NCT03424629",
                                  rationale="reviewed", decided_by="dsmb-1"))
    dosing_hold = cloud(PatientDosingHeld(hold_id="h-2", patient_id="PT-1", rule_id="R4"))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        for event in (pause, pause, dosing_hold, lift):  # the pause arrives twice
            await producer.send_and_wait(topic, event.to_bytes(), key=b"NCT03424629")
    finally:
        await producer.stop()
    runner = ConsumerRunner(store, settings, [topic], handlers(PROTOCOL),
                            group_id=f"g-{uuid.uuid4().hex[:8]}")
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await eventually(lambda: runner.records_seen >= 4, timeout=120, what="four records")
    finally:
        stop.set()
        await task
    holds = await store.read_stream(commands.HOLDS_STREAM)
    assert [e.type for e in holds] == ["RandomizationHoldApplied", "RandomizationHoldLifted"]
    assert holds[0].metadata["causation_id"] == pause.id
    assert holds[0].metadata["correlation_id"] == "corr-1"
    assert runner.duplicates == 1 and runner.dead_lettered == 0
    assert domain.fold_holds([e.payload() for e in holds]).in_force("enrollment_paused") is None


@contextlib.asynccontextmanager
async def write_lock(database_url: str) -> AsyncIterator[None]:
    """The store's commit lock, held by another connection (as another replica's commit would):
    this process's commits wait for it."""
    other = EventStore(database_url)
    try:
        async with other.engine.begin() as conn:
            if other.sqlite:  # BEGIN IMMEDIATE goes with the first statement (D68)
                await conn.execute(sa.text("SELECT 1"))
            else:
                await conn.execute(sa.text("SELECT * FROM event_store_lock(CAST(:s AS text[]))"),
                                   {"s": []})
            yield
    finally:
        await other.close()


async def test_queued_randomizations_decide_while_the_one_before_commits(
        store: EventStore, database_url: str) -> None:
    """D59: a randomization decides on the allocation the one before it staged, so those queued
    in one process share a group commit instead of one commit each (and stay gapless)."""
    patients = [await enrolled(store, 14.2 if n % 2 else 30.0) for n in range(10)]
    before = store.group_commits
    async with write_lock(database_url):
        tasks = [asyncio.ensure_future(commands.randomize(store, p, COORDINATOR, PROTOCOL, SECRET,
                                                        META)) for p in patients]
        # Every one has decided and is waiting for the commit: none waited for another's.
        await eventually(lambda: store.in_flight == len(patients), what="all ten queued")
        assert store.group_commits == before
    results = await asyncio.gather(*tasks)
    assert store.group_commits - before <= 2  # the first alone (it had the lock), then the rest
    assert sorted(r.assignment.randomization_number for r in results) == list(range(1, 11))
    assert {r.assignment.patient_id for r in results} == set(patients)
    allocation = await store.read_stream(commands.ALLOCATION_STREAM)
    assert [e.data["randomization_number"] for e in allocation] == list(range(1, 11))
    assert (await store.verify()).ok


async def test_a_randomization_decided_on_a_failed_ones_allocation_runs_again(
        store: EventStore, database_url: str) -> None:
    """D59: when the randomization whose staged allocation the next one decided on fails, the
    next one does not commit on that allocation: it runs again, and the numbers stay gapless."""
    first, withdrawn, other = [await enrolled(store) for _ in range(3)]
    await commands.randomize(store, first, COORDINATOR, PROTOCOL, SECRET, META)  # number 1
    async with write_lock(database_url):
        withdrawal = asyncio.ensure_future(
            commands.withdraw(store, withdrawn, "moved away", COORDINATOR, PROTOCOL, META))
        await eventually(lambda: store.in_flight == 1, what="the withdrawal queued")
        # Read before the withdrawal commits, so it will fail; it stages number 2 first.
        failing = asyncio.ensure_future(
            commands.randomize(store, withdrawn, COORDINATOR, PROTOCOL, SECRET, META))
        await eventually(lambda: store.in_flight == 2, what="the doomed randomization queued")
        following = asyncio.ensure_future(
            commands.randomize(store, other, COORDINATOR, PROTOCOL, SECRET, META))
        await eventually(lambda: store.in_flight == 3, what="the next one queued")
    await withdrawal
    with pytest.raises(Refused) as refused:
        await failing
    assert refused.value.code == "withdrawn"
    assert (await following).assignment.randomization_number == 2  # not 3: it ran again
    allocation = await store.read_stream(commands.ALLOCATION_STREAM)
    assert [e.data["randomization_number"] for e in allocation] == [1, 2]
    assert [e.data["patient_id"] for e in allocation] == [first, other]
    assert (await store.verify()).ok


async def test_a_randomization_never_commits_on_the_allocation_of_one_that_failed(
        store: EventStore, database_url: str) -> None:
    """D59, the case the versions alone would miss: a replica's randomization fills the version
    the failed one had staged, so the next one's read version matches; it must still run again,
    or it would take a slot of the failed one's stratum (slot 2 of a sequence whose slot 1 went
    to nobody)."""
    replica = EventStore(database_url)
    try:
        doomed, follower = await enrolled(store, 30.0), await enrolled(store, 30.0)
        elsewhere = await enrolled(store, 14.2)  # another stratum
        inside, release = asyncio.Event(), asyncio.Event()

        async def hold(_: Any) -> None:  # the replica's commit, paused holding the store's lock
            inside.set()
            await release.wait()

        async def replica_randomizes() -> commands.Randomized:
            before_commit.set((hold,))
            return await commands.randomize(replica, elsewhere, COORDINATOR, PROTOCOL, SECRET,
                                            META)

        first = asyncio.ensure_future(replica_randomizes())
        await eventually(inside.is_set, what="the replica's commit under way")
        failing = asyncio.ensure_future(  # reads the allocation empty: fails after the replica's
            commands.randomize(store, doomed, COORDINATOR, PROTOCOL, SECRET, META))
        await eventually(lambda: store.in_flight == 1, what="the doomed randomization queued")
        following = asyncio.ensure_future(  # decides on the doomed one's staged allocation
            commands.randomize(store, follower, COORDINATOR, PROTOCOL, SECRET, META))
        await eventually(lambda: store.in_flight == 2, what="the next one queued")
        release.set()
        results = await asyncio.gather(first, failing, following)
    finally:
        await replica.close()
    assert all(r.created for r in results)  # the doomed one ran again and succeeded too
    allocation = await store.read_stream(commands.ALLOCATION_STREAM)
    assert [e.data["randomization_number"] for e in allocation] == [1, 2, 3]
    assert allocation[0].data["patient_id"] == elsewhere
    slots: dict[str, list[int]] = {}
    for event in allocation:
        slots.setdefault(event.data["stratum"], []).append(event.data["stratum_slot"])
    assert all(used == list(range(1, len(used) + 1)) for used in slots.values()), slots
    assert (await store.verify()).ok


def slot(number: int, stratum: str, patient: str) -> AllocationSlotUsed:
    return AllocationSlotUsed(randomization_number=number, stratum=stratum, stratum_slot=1,
                              patient_id=patient, site_id="S1", pasi_band="pasi_ge20",
                              arm="mtx", method="permuted_blocks")


async def test_a_fold_over_a_staged_allocation_is_never_kept(
        store: EventStore, database_url: str) -> None:
    """D59: a load that starts from another transaction's staged allocation and reads a
    replica's newer events must not keep that fold as the process's snapshot: the staged slot
    may never commit, and every later randomization would then decide on a slot that went to
    nobody."""
    snapshot = Snapshot(domain.ALLOCATION, commands.ALLOCATION_STREAM)
    replica = EventStore(database_url)
    try:
        async with store.transaction() as first:  # stages a slot it will fail to commit
            s = Session(first)
            state = await snapshot.load(s, staged=True)
            staged = slot(1, "A", "PT-STAGED")
            await s.append(commands.ALLOCATION_STREAM, [staged], META)
            snapshot.stage(s, domain.ALLOCATION.fold([staged], state))
            for n in (1, 2):  # meanwhile a replica commits two slots of its own
                await replica.append(commands.ALLOCATION_STREAM,
                                     [NewEvent.of(slot(n, "B", f"PT-R{n}"), META)], n - 1)
            with pytest.raises(ConcurrencyError):  # the next one reads the staged slot
                async with store.transaction() as second:
                    await snapshot.load(Session(second), staged=True)
                    await second.append("other", [NewEvent.of(slot(3, "C", "PT-3"), META)],
                                        None)
            await first.close_reads()
        raise AssertionError("the staged slot committed over the replica's")
    except ConcurrencyError:
        pass
    finally:
        await replica.close()
    async with store.transaction() as third:
        loaded = await snapshot.load(Session(third), staged=True)
    recorded = await store.read_stream(commands.ALLOCATION_STREAM)
    assert [e.data["patient_id"] for e in recorded] == ["PT-R1", "PT-R2"]
    assert loaded == domain.ALLOCATION.fold([e.payload() for e in recorded])
    assert loaded.assigned == 2


async def test_an_allocation_read_ahead_at_a_staged_version_that_failed_runs_the_command_again(
        store: EventStore) -> None:
    """D81: the randomization reads the allocation ahead, after the version a pending staging
    left. Should that staging fail before the load, the load starts lower than what was read
    ahead: the command must run again, never fold a read that skipped events."""
    snapshot = Snapshot(domain.ALLOCATION, commands.ALLOCATION_STREAM)
    await store.append(commands.ALLOCATION_STREAM, [NewEvent.of(slot(1, "A", "PT-1"), META)], 0)
    with pytest.raises(Abandoned):
        async with store.transaction() as first:
            s1 = Session(first)
            state = await snapshot.load(s1, staged=True)
            staged = slot(2, "A", "PT-2")
            await s1.append(commands.ALLOCATION_STREAM, [staged], META)
            snapshot.stage(s1, domain.ALLOCATION.fold([staged], state))
            async with store.transaction() as second:
                s2 = Session(second)
                ahead = snapshot.version_to_read(s2, staged=True)
                assert ahead == 2  # after the staged slot
                await s2.read_ahead({commands.ALLOCATION_STREAM: ahead})
                first.settle(False)  # the staging transaction fails meanwhile
                assert snapshot.version_to_read(s2, staged=True) == 1
                with pytest.raises(ConcurrencyError):
                    await snapshot.load(s2, staged=True)
            await first.close_reads()
            raise Abandoned
    assert [e.data["patient_id"] for e in await store.read_stream(
        commands.ALLOCATION_STREAM)] == ["PT-1"]


class Abandoned(Exception):
    pass
