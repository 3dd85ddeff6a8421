"""The consumer runner against the real broker and database: redelivery, poison records, DLQ."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from sqlalchemy.exc import DBAPIError

from shared import consumer
from shared.consumer import MAX_HANDLER_ATTEMPTS, ConsumerRunner, Delivery, Handler
from shared.events import ENROLLMENT, CloudEvent, PatientWithdrawn, dlq_topic
from shared.kafka import ensure_topics
from shared.settings import Settings
from shared.store import EventStore, NewEvent, Transaction, utcnow
from tests.support import eventually, read_topic


def withdrawal(patient: str) -> CloudEvent:
    data = PatientWithdrawn(patient_id=patient, site_id="S1", reason="moved away",
                            withdrawn_at=utcnow())
    return CloudEvent(id=str(uuid.uuid4()), source="/services/test", type="PatientWithdrawn",
                      subject=patient, time=utcnow(), data=data.model_dump(mode="json"), sequence=1)


async def count_down(tx: Transaction, delivery: Delivery) -> None:
    """A handler with a visible effect: one event per handled record, in the patient's stream."""
    assert isinstance(delivery.data, PatientWithdrawn)
    await tx.append(f"seen-{delivery.data.patient_id}",
                    [NewEvent("Seen", {"event_id": delivery.event.id})], None)


async def produce(settings: Settings, topic: str, *values: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"k")  # one key: one partition, in order
    finally:
        await producer.stop()


async def run_until(runner: ConsumerRunner, condition: Callable[[], bool], what: str) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await eventually(condition, what=what)
    finally:
        stop.set()
        await task


async def test_the_same_record_delivered_twice_changes_state_once(
        settings: Settings, store: EventStore) -> None:
    topic = f"test.redelivery.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic, dlq_topic(topic)])
    event, other = withdrawal("P1"), withdrawal("P1")
    # The relay may resend after a crash: the same event arrives as two records.
    await produce(settings, topic, event.to_bytes(), event.to_bytes(), other.to_bytes())
    runner = ConsumerRunner(store, settings, [topic], {"PatientWithdrawn": count_down},
                            group_id=f"g-{uuid.uuid4().hex[:8]}")
    await run_until(runner, lambda: runner.handled >= 2 and _consumed(runner, 3), "3 records")
    seen = await store.read_stream("seen-P1")
    assert [e.data["event_id"] for e in seen] == [event.id, other.id]
    assert runner.duplicates == 1


def _consumed(runner: ConsumerRunner, n: int) -> bool:
    return runner.records_seen >= n


async def test_a_redelivery_after_a_crash_before_the_offset_commit_changes_nothing(
        settings: Settings, store: EventStore) -> None:
    topic = f"test.crash.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic, dlq_topic(topic)])
    event = withdrawal("P2")
    await produce(settings, topic, event.to_bytes())
    group = f"g-{uuid.uuid4().hex[:8]}"

    async def crash_after_commit(tx: Transaction, delivery: Delivery) -> None:
        await count_down(tx, delivery)

    first = ConsumerRunner(store, settings, [topic], {"PatientWithdrawn": crash_after_commit},
                           group_id=group)
    first.commit_offsets = False  # the process dies after the database commit, before Kafka's
    await run_until(first, lambda: first.handled == 1, "first delivery")
    second = ConsumerRunner(store, settings, [topic], {"PatientWithdrawn": count_down},
                            group_id=group)
    await run_until(second, lambda: _consumed(second, 1), "redelivery")
    assert second.handled == 0 and second.duplicates == 1
    assert len(await store.read_stream("seen-P2")) == 1


async def test_poison_records_go_to_the_dlq_and_the_next_good_record_is_handled(
        settings: Settings, store: EventStore) -> None:
    topic = f"test.poison.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic, dlq_topic(topic)])
    bad_data = withdrawal("P3").model_copy(update={"data": {"patient_id": "P3"}})
    good = withdrawal("P3")
    await produce(settings, topic, b"\x00not json at all", b'{"specversion": "1.0"}',
                  bad_data.to_bytes(), good.to_bytes())
    runner = ConsumerRunner(store, settings, [topic], {"PatientWithdrawn": count_down},
                            group_id=f"g-{uuid.uuid4().hex[:8]}")
    await run_until(runner, lambda: runner.handled == 1, "the good record")
    assert runner.dead_lettered == 3
    assert [e.data["event_id"] for e in await store.read_stream("seen-P3")] == [good.id]
    dead = await read_topic(settings.kafka_bootstrap_servers, dlq_topic(topic),
                            until=lambda rs: len(rs) >= 3)
    assert [r.value for r in dead][:2] == [b"\x00not json at all", b'{"specversion": "1.0"}']
    headers = dict(dead[2].headers)
    assert headers["dlq_topic"] == topic.encode()
    assert b"invalid PatientWithdrawn data" in headers["dlq_error"]


async def test_a_failing_handler_dead_letters_after_retries_without_writing(
        settings: Settings, store: EventStore) -> None:
    topic = f"test.failing.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic, dlq_topic(topic)])
    doomed, fine = withdrawal("P4"), withdrawal("P5")

    async def sometimes_broken(tx: Transaction, delivery: Delivery) -> None:
        await count_down(tx, delivery)  # written, then rolled back with the failure
        if delivery.event.id == doomed.id:
            raise ValueError("cannot handle this one")

    await produce(settings, topic, doomed.to_bytes(), fine.to_bytes())
    runner = ConsumerRunner(store, settings, [topic], {"PatientWithdrawn": sometimes_broken},
                            group_id=f"g-{uuid.uuid4().hex[:8]}")
    await run_until(runner, lambda: runner.handled == 1, "the fine record")
    assert runner.dead_lettered == 1
    assert await store.read_stream("seen-P4") == []
    assert len(await store.read_stream("seen-P5")) == 1


async def test_a_database_shutting_down_is_waited_out_never_dead_lettered(
        settings: Settings, store: EventStore) -> None:
    # PostgreSQL refusing work while it shuts down (SQLSTATE 57P03) reaches a handler as a plain
    # DBAPIError, its connection not invalidated: more failures than a bad record is allowed,
    # and still the record waits for the database and is filed, once (a CI run, 2026-12-02).
    topic = f"test.shutdown.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic, dlq_topic(topic)])
    record = withdrawal("P6")
    refusals = MAX_HANDLER_ATTEMPTS + 1

    async def while_postgres_shuts_down(tx: Transaction, delivery: Delivery) -> None:
        nonlocal refusals
        if refusals:
            refusals -= 1
            adapted = Exception("the database system is shutting down")
            adapted.__cause__ = asyncpg.exceptions.CannotConnectNowError(str(adapted))
            raise DBAPIError("SELECT", None, adapted)
        await count_down(tx, delivery)

    await produce(settings, topic, record.to_bytes())
    runner = ConsumerRunner(store, settings, [topic],
                            {"PatientWithdrawn": while_postgres_shuts_down},
                            group_id=f"g-{uuid.uuid4().hex[:8]}")
    await run_until(runner, lambda: runner.handled == 1, "the record, once the database is back")
    assert (refusals, runner.dead_lettered) == (0, 0)
    assert [e.data["event_id"] for e in await store.read_stream("seen-P6")] == [record.id]


async def fetched(settings: Settings, *values: bytes) -> list[ConsumerRecord]:
    """`values` as real records of a topic of their own, one partition, as a fetch returns
    them (and the topic, for the DLQ)."""
    topic = f"test.batch.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic, dlq_topic(topic)])
    await produce(settings, topic, *values)
    return await read_topic(settings.kafka_bootstrap_servers, topic,
                            until=lambda rs: len(rs) >= len(values))


def batch_runner(store: EventStore, settings: Settings, records: list[ConsumerRecord],
                 handler: Handler = count_down) -> ConsumerRunner:
    return ConsumerRunner(store, settings, [records[0].topic], {"PatientWithdrawn": handler},
                          group_id=f"g-{uuid.uuid4().hex[:8]}")


async def filed_in_order(store: EventStore, settings: Settings, records: list[ConsumerRecord],
                         events: list[CloudEvent], patient: str) -> tuple[ConsumerRunner, int]:
    """`records` handled as one fetch by `count_down`, which filed `events` in order: the runner,
    and how many commits it took."""
    runner = batch_runner(store, settings, records)
    commits = store.group_commits
    await runner.handle_batch(records)
    assert [e.data["event_id"] for e in await store.read_stream(f"seen-{patient}")] == [
        e.id for e in events]
    return runner, store.group_commits - commits


async def test_a_fetch_whose_records_read_nothing_staged_is_filed_in_one_commit_in_order_and_once(
        settings: Settings, store: EventStore) -> None:
    events = [withdrawal("P7") for _ in range(5)]
    # The third record repeats the first: a relay's resend within the same fetch.
    values = [e.to_bytes() for e in events[:2]] + [events[0].to_bytes()] + [
        e.to_bytes() for e in events[2:]]
    records = await fetched(settings, *values)
    runner, commits = await filed_in_order(store, settings, records, events, "P7")
    assert commits == 1
    assert (runner.handled, runner.duplicates, runner.records_seen) == (5, 1, 6)
    # The same fetch again (a crash before the offset commit): nothing changes.
    again = batch_runner(store, settings, records)
    again.group_id = runner.group_id
    await again.handle_batch(records)
    assert (again.handled, again.duplicates) == (0, 6)
    assert len(await store.read_stream("seen-P7")) == 5


async def test_a_poison_record_in_a_batch_goes_to_the_dlq_alone_and_the_rest_are_filed(
        settings: Settings, store: EventStore) -> None:
    first, last = withdrawal("P8"), withdrawal("P8")
    records = await fetched(settings, first.to_bytes(), b"\x00not json", last.to_bytes())
    runner = batch_runner(store, settings, records)
    await runner.handle_batch(records)
    assert runner.dead_lettered == 1 and runner.handled == 2
    assert [e.data["event_id"] for e in await store.read_stream("seen-P8")] == [first.id, last.id]
    dead = await read_topic(settings.kafka_bootstrap_servers, dlq_topic(records[0].topic),
                            until=lambda rs: len(rs) >= 1)
    assert [r.value for r in dead] == [b"\x00not json"]
    await runner.dlq.drop()


async def test_a_handler_failing_on_one_record_of_a_batch_dead_letters_only_that_record(
        settings: Settings, store: EventStore) -> None:
    events = [withdrawal("P9") for _ in range(3)]
    doomed = events[1].id

    async def fails_on_one(tx: Transaction, delivery: Delivery) -> None:
        if delivery.event.id == doomed:
            raise RuntimeError("a bug that only this record meets")
        await count_down(tx, delivery)

    records = await fetched(settings, *(e.to_bytes() for e in events))
    runner = batch_runner(store, settings, records, fails_on_one)
    await runner.handle_batch(records)
    # The failed batch wrote nothing; one record at a time filed the others once each.
    assert [e.data["event_id"] for e in await store.read_stream("seen-P9")] == [
        events[0].id, events[2].id]
    assert runner.dead_lettered == 1 and runner.handled == 2
    await runner.dlq.drop()


async def count_on(tx: Transaction, delivery: Delivery) -> None:
    """A command that reads what it appends to: the patient's count so far, then one more (the
    shape of dosing's and efficacy's handlers: load a stream, decide, append at its version)."""
    assert isinstance(delivery.data, PatientWithdrawn)
    stream = f"count-{delivery.data.patient_id}"
    so_far = await tx.read_stream(stream)
    await tx.append(stream, [NewEvent("Counted", {"n": len(so_far) + 1,
                                                  "event_id": delivery.event.id})], len(so_far))


async def test_a_record_that_reads_what_an_earlier_one_staged_starts_the_next_commit(
        settings: Settings, store: EventStore) -> None:
    # P11, P12, P11, P11, P12: the third record reads P11's stream, which the first staged, so a
    # new transaction starts there; the fourth reads what the third staged: a third one. Without
    # the split, the third would count from a stale read and its append would conflict forever.
    patients = ["P11", "P12", "P11", "P11", "P12"]
    events = [withdrawal(p) for p in patients]
    records = await fetched(settings, *(e.to_bytes() for e in events))
    runner = batch_runner(store, settings, records, count_on)
    commits = store.group_commits
    await runner.handle_batch(records)
    assert store.group_commits - commits == 3
    assert (runner.handled, runner.duplicates, runner.dead_lettered) == (5, 0, 0)
    for patient in ("P11", "P12"):
        counted = [e.data for e in await store.read_stream(f"count-{patient}")]
        assert [c["n"] for c in counted] == list(range(1, len(counted) + 1))
        assert [c["event_id"] for c in counted] == [
            e.id for e, p in zip(events, patients, strict=True) if p == patient]


async def test_a_read_across_streams_after_an_earlier_record_staged_writes_starts_the_next_commit(
        settings: Settings, store: EventStore) -> None:
    # Safety's shape: the whole store read (its projection), then an append. Each record after
    # the first would miss the one before it, so each gets a commit of its own.
    async def tally(tx: Transaction, delivery: Delivery) -> None:
        everything = await tx.read_all()
        await tx.append(f"tally-{delivery.event.id}",
                        [NewEvent("Tallied", {"before": len(everything)})], None)

    records = await fetched(settings, *(withdrawal("P13").to_bytes() for _ in range(3)))
    runner = batch_runner(store, settings, records, tally)
    head, commits = await store.head(), store.group_commits
    await runner.handle_batch(records)
    assert store.group_commits - commits == 3
    befores = [e.data["before"] for e in await store.read_all(after=head)]
    assert befores == [head, head + 1, head + 2]


async def test_a_handler_reading_its_own_staged_append_is_dead_lettered_not_looped(
        settings: Settings, store: EventStore) -> None:
    async def rereads(tx: Transaction, delivery: Delivery) -> None:
        await tx.append("mine", [NewEvent("Seen", {})], None)
        await tx.read_stream("mine")  # a bug: it would not see what it just staged

    records = await fetched(settings, *(withdrawal("P14").to_bytes() for _ in range(2)))
    runner = batch_runner(store, settings, records, rereads)
    await runner.handle_batch(records)
    assert (runner.handled, runner.dead_lettered) == (0, 2)
    assert await store.read_stream("mine") == []
    await runner.dlq.drop()


async def test_a_record_whose_source_does_not_own_its_topic_goes_to_the_dlq_unapplied(
        settings: Settings, store: EventStore) -> None:
    """Anyone who can write to the broker could publish a withdrawal (or a hold lifted): the
    consumer applies a trial topic's records only from the topic's owner (D42)."""
    patient = f"P-{uuid.uuid4().hex[:8]}"
    forged = withdrawal(patient).model_copy(update={"source": "/services/dosing"})
    genuine = withdrawal(patient).model_copy(update={"source": "/services/randomization"})
    await ensure_topics(settings, [ENROLLMENT, dlq_topic(ENROLLMENT)])
    await produce(settings, ENROLLMENT, forged.to_bytes(), genuine.to_bytes())
    ours = {forged.id, genuine.id}
    found = await read_topic(settings.kafka_bootstrap_servers, ENROLLMENT,
                             until=lambda rs: ours <= {_event_id(r) for r in rs})
    runner = ConsumerRunner(store, settings, [ENROLLMENT], {"PatientWithdrawn": count_down},
                            group_id=f"g-{uuid.uuid4().hex[:8]}")
    for record in (r for r in found if _event_id(r) in ours):
        await runner.handle_record(record)
    assert [e.data["event_id"] for e in await store.read_stream(f"seen-{patient}")] == [
        genuine.id]
    assert runner.dead_lettered == 1 and runner.handled == 1
    dead = await read_topic(settings.kafka_bootstrap_servers, dlq_topic(ENROLLMENT),
                            until=lambda rs: forged.id in {_event_id(r) for r in rs})
    headers = dict(next(r for r in dead if _event_id(r) == forged.id).headers)
    assert b"/services/dosing may not publish to trial.enrollment" in headers["dlq_error"]
    await runner.dlq.drop()


def _event_id(record: ConsumerRecord) -> str | None:
    try:
        return CloudEvent.from_bytes(record.value or b"").id
    except ValueError:
        return None


class CountingCommits(ConsumerRunner):
    """Counts the offset commits it sends the group and the fetches it handled records from."""

    commits = 0

    async def commit_handled(self, consumer: AIOKafkaConsumer) -> None:
        self.commits += bool(self._uncommitted)
        await super().commit_handled(consumer)


async def group_offset(settings: Settings, group: str, tp: TopicPartition) -> int | None:
    reader = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=group,
                              enable_auto_commit=False)
    await reader.start()
    try:
        return await reader.committed(tp)
    finally:
        await reader.stop()


async def test_offsets_are_told_the_group_once_an_interval_and_all_of_them_on_stop(
        settings: Settings, store: EventStore) -> None:
    """D61: records handled one fetch at a time share one offset commit within the interval;
    stopping tells the group the rest, so a new reader in the group reads nothing again."""
    topic = f"test.interval.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic, dlq_topic(topic)])
    group = f"g-{uuid.uuid4().hex[:8]}"
    slow = settings.model_copy(update={"kafka_commit_interval_ms": 600_000})
    runner = CountingCommits(store, slow, [topic], {"PatientWithdrawn": count_down}, group_id=group)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await eventually(lambda: runner.reading.is_set(), what="partitions assigned")
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
        await producer.start()
        sent: list[int] = []
        try:
            for n in range(20):  # one at a time, each waited for: mostly a fetch each
                await producer.send_and_wait(topic, withdrawal(f"P-i{n}").to_bytes(), key=b"k")
                sent.append(n)
                await eventually(lambda: runner.handled >= len(sent), what=f"record {n} handled")
        finally:
            await producer.stop()
    finally:
        stop.set()
        await task
    (tp,) = runner.committed_here
    assert runner.committed_here[tp] == 20
    # Told when a fetch came back empty or on stop, never once a fetch: fewer than 20.
    assert 1 <= runner.commits < 20, runner.commits
    assert await group_offset(settings, group, tp) == 20
    again = ConsumerRunner(store, settings, [topic], {"PatientWithdrawn": count_down},
                           group_id=group)
    await run_until(again, lambda: again.reading.is_set(), "the same group again")
    assert (again.records_seen, again.handled) == (0, 0)


async def test_a_run_commits_once_its_time_budget_is_spent(
        settings: Settings, store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # Records that could all share one transaction (test_a_fetch_whose_records_read_nothing...):
    # with no time to spend, each run ends after its first record (D80).
    monkeypatch.setattr(consumer, "RUN_BUDGET_S", 0.0)
    events = [withdrawal("P15") for _ in range(4)]
    records = await fetched(settings, *(e.to_bytes() for e in events))
    _, commits = await filed_in_order(store, settings, records, events, "P15")
    assert commits == 4


class _Batches(ConsumerRunner):
    """A runner that notes the size of each fetch it files as a batch."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.batch_sizes: list[int] = []

    async def handle_batch(self, records: list[ConsumerRecord]) -> None:
        self.batch_sizes.append(len(records))
        await super().handle_batch(records)


@contextlib.asynccontextmanager
async def _lingering(settings: Settings, store: EventStore, topics: list[str]
                     ) -> AsyncIterator[tuple[_Batches, AIOKafkaProducer]]:
    """A running consumer of `topics` that lingers a minute after each fetch, and a producer;
    its first record (on `topics[0]`, patient P-0) handled at once."""
    await ensure_topics(settings, [*topics, *map(dlq_topic, topics)])
    runner = _Batches(store, settings, topics, {"PatientWithdrawn": count_down},
                      group_id=f"g-{uuid.uuid4().hex[:8]}", linger_ms=60_000)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topics[0], withdrawal("P-0").to_bytes(), key=b"k")
        await eventually(lambda: runner.handled == 1, what="the first record, at once")
        yield runner, producer
    finally:
        await producer.stop()
        stop.set()
        await task


async def test_a_linger_gathers_records_and_a_request_waiting_for_the_consumer_cuts_it_short(
        settings: Settings, store: EventStore) -> None:
    """D84: after a fetch that found records the consumer lets more gather (its linger, here a
    minute) and files them together, unless a request waits for it (`caught_up`, which every
    dose and assessment does before it decides): then it reads at once."""
    topic = f"test.linger.{uuid.uuid4().hex[:8]}"
    async with _lingering(settings, store, [topic]) as (runner, producer):
        # Three more in one produce request: fetched together, and held while the consumer
        # lingers after the first.
        sent = [await producer.send(topic, withdrawal(f"P-l{n}").to_bytes(), key=b"k")
                for n in (1, 2, 3)]
        await producer.flush()
        await asyncio.gather(*sent)
        live = runner._consumer
        assert live is not None

        def fetched() -> bool:
            return any(live.highwater(tp) == 4 for tp in live.assignment())

        await eventually(fetched, what="the three records fetched")
        assert runner.handled == 1 and runner.batch_sizes == []  # lingering: not filed yet
        assert await runner.caught_up(topic, "k", timeout=30)  # far shorter than the linger
        assert runner.handled == 4
        assert runner.batch_sizes == [3]  # one fetch, filed together
        assert len(await store.read_stream("seen-P-l3")) == 1


async def test_a_fetch_across_topics_is_filed_as_one_batch(settings: Settings,
                                                           store: EventStore) -> None:
    """D85: the records of one fetch from several topics (or partitions) share one batch, and
    so one transaction and one commit, where each partition's records had one of their own; each
    record's log line and offset stay its own."""
    topics = [f"test.across.{uuid.uuid4().hex[:8]}" for _ in range(2)]
    async with _lingering(settings, store, topics) as (runner, producer):
        # One on each topic while the consumer lingers: fetched, then filed together.
        for n, topic in enumerate(topics, start=1):
            await producer.send_and_wait(topic, withdrawal(f"P-x{n}").to_bytes(), key=b"k")
        live = runner._consumer
        assert live is not None

        def fetched() -> bool:
            marks = {tp.topic: live.highwater(tp) for tp in live.assignment()
                     if live.highwater(tp)}
            return marks == {topics[0]: 2, topics[1]: 1}

        await eventually(fetched, what="both records fetched")
        assert runner.handled == 1 and runner.batch_sizes == []  # lingering: not filed yet
        assert await runner.caught_up(topics[1], "k", timeout=30)
        assert runner.handled == 3
        assert runner.batch_sizes == [2]  # two topics, one batch
        assert [len(await store.read_stream(f"seen-P-x{n}")) for n in (1, 2)] == [1, 1]
        assert {tp.topic: offset for tp, offset in runner.committed_here.items()} == {
            topics[0]: 2, topics[1]: 1}


async def test_a_full_fetch_is_a_backlog_and_the_next_is_taken_without_a_linger(
        settings: Settings, store: EventStore) -> None:
    """D92: a fetch that hands over `max_records` leaves records waiting, so the consumer takes
    the next at once; only a fetch short of it lingers. Lingering after every fetch held a
    backlog (a restart, an outage) to `max_records` a linger: the audit ledger caught up at
    half its speed. Here a linger is ten minutes and a fetch three records: a backlog of seven
    is filed as 3 + 3 + 1 within a minute, and the short fetch that ended it lingers (until the
    consumer is stopped, which ends a linger at once)."""
    topic = f"test.backlog.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic, dlq_topic(topic)])
    await produce(settings, topic, *(withdrawal(f"P-b{n}").to_bytes() for n in range(7)))
    runner = _Batches(store, settings, [topic], {"PatientWithdrawn": count_down},
                      group_id=f"g-{uuid.uuid4().hex[:8]}", linger_ms=600_000)
    runner.max_records = 3
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await eventually(lambda: runner.handled == 7, what="the backlog, no linger between")
        assert runner.batch_sizes == [3, 3]  # then one record alone, handled as a record
        assert [len(await store.read_stream(f"seen-P-b{n}")) for n in range(7)] == [1] * 7
        await produce(settings, topic, withdrawal("P-b7").to_bytes())
        live = runner._consumer
        assert live is not None
        await eventually(lambda: any(live.highwater(tp) == 8 for tp in live.assignment()),
                         what="the eighth record fetched")
        assert runner.handled == 7  # the short fetch lingers: not filed yet
        stop.set()  # a stop ends the linger: a service's shutdown does not wait it out
        await asyncio.wait_for(task, timeout=60)  # a tenth of the linger
    finally:
        stop.set()
        await task


async def test_the_log_end_is_asked_beside_the_consumer_s_fetch_not_behind_it(
        settings: Settings, store: EventStore) -> None:
    """D87. `caught_up` (every dose and assessment waits for it) asks the log's end over
    connections of its own, never over the consumer's: Kafka answers a connection's requests
    one at a time and holds an idle consumer's fetch up to `fetch_max_wait_ms`, so over the
    consumer's connection every dose first waited out that fetch. Here a fetch may wait 5 s: the
    catch-up sends nothing over the consumer's connections and answers within half of that."""
    slow = settings.model_copy(update={"kafka_fetch_max_wait_ms": 5000})
    topic = f"test.ends.{uuid.uuid4().hex[:8]}"
    await ensure_topics(slow, [topic, dlq_topic(topic)])
    runner = ConsumerRunner(store, slow, [topic], {"PatientWithdrawn": count_down},
                            group_id=f"g-{uuid.uuid4().hex[:8]}")
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await produce(slow, topic, withdrawal("P-e").to_bytes())
        await eventually(lambda: runner.handled == 1, what="the record handled")
        live = runner._consumer
        assert live is not None
        sent: list[str] = []
        send = live._client.send

        async def counted(node_id: object, request: object, **kwargs: object) -> object:
            sent.append(type(request).__name__)
            return await send(node_id, request, **kwargs)

        live._client.send = counted
        assert await runner.caught_up(topic, "k", timeout=2.5)  # the next fetch still waits
        assert "OffsetRequest" not in sent, sent
        await produce(slow, topic, withdrawal("P-f").to_bytes())  # a new end, asked the same way
        assert await runner.caught_up(topic, "k", timeout=30)
        assert runner.handled == 2 and "OffsetRequest" not in sent, sent
    finally:
        stop.set()
        await task


def test_a_service_s_linger_is_its_own_unless_the_settings_say_otherwise(tmp_path: Path) -> None:
    from services.dosing.app import spec as dosing
    from services.randomization.app import spec as randomization
    from shared.runtime import Runtime

    url = f"sqlite+aiosqlite:///{tmp_path / 'linger.db'}"  # never opened
    own = Runtime(dosing, Settings(service_name="dosing", database_url=url))
    told = Runtime(dosing, Settings(service_name="dosing", database_url=url,
                                    kafka_consumer_linger_ms=0))
    never = Runtime(randomization, Settings(service_name="randomization", database_url=url))
    assert own.consumer is not None and told.consumer is not None and never.consumer is not None
    assert own.consumer.linger_s == 0.1
    assert told.consumer.linger_s == 0
    assert never.consumer.linger_s == 0  # its enrolment gate reads holds without waiting
