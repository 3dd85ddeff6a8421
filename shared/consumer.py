"""The consumer runner: one consumer group per service, handled exactly once in effect.

For each record: parse the CloudEvent, and in one database transaction skip it if its event id
was processed already, else run the handler and record the id. The Kafka offset is committed
only after that transaction commits, so a crash in between redelivers, and the redelivery
changes nothing. A record that cannot be parsed or handled goes to `<topic>.dlq` with the error,
and the consumer moves on: one bad record never stops the stream nor loops a service.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError

from shared.errors import ConcurrencyError
from shared.events import ARMS, CATALOGUE, CloudEvent, EventData, SafetyHold, dlq_topic, may_publish
from shared.failpoints import BEFORE_OFFSET_COMMIT, Failpoints
from shared.kafka import LazyProducer, client_options, logical, physical, quietly
from shared.retry import Stopped, on_conflict_again, retry
from shared.settings import Settings
from shared.store import EventStore, Metadata, StagedRead, Transaction, database_unavailable
from shared.tracing import (
    noted_outcomes,
    noted_parse,
    record_in_batch,
    traced_batch,
    traced_record,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """What a handler receives: the envelope, its typed data, and where it came from."""

    event: CloudEvent
    data: EventData | None  # None only for a catch-all ("*") handler and an unknown type
    topic: str

    def caused_by(self) -> Metadata:
        """Metadata for what a handler writes in answer: the same people and request, caused
        by this event (its correlation carried on, or started here)."""
        e = self.event
        return Metadata(actor=e.actor, role=e.actorrole, site=e.actorsite,
                        correlation_id=e.correlationid or e.id, causation_id=e.id,
                        reason=e.reason)


Handler = Callable[[Transaction, Delivery], Awaitable[None]]
# Handlers that store every delivery they apply as an event under the delivery's own event id
# (the audit ledger, D89): the stored id, unique in the database and committed in the same
# transaction, is the processed mark, so none is written beside it.
_FILED_UNDER_EVENT_ID: set[Handler] = set()


def files_under_event_id(handler: Handler) -> Handler:
    """Declare that `handler` stores each delivery as an event with the delivery's id (or finds
    it stored): its consumer then takes a stored id for processed and writes no mark (D89)."""
    _FILED_UNDER_EVENT_ID.add(handler)
    return handler


def marks_by_event_id(handler: Handler) -> bool:
    """Whether a record `handler` applied is known by its event id in the store, not a mark."""
    return handler in _FILED_UNDER_EVENT_ID


# Records looked up at once (processed? stored?) as a shared transaction reaches them: a few
# first (a consumer whose runs end early, at a record that reads what an earlier one staged,
# asks for few ids it will not reach), twice as many each time the run goes on, up to a most.
PREFETCH_FIRST, PREFETCH_MOST = 4, 512
# A run of records sharing one transaction commits once it has taken this long (D80): what the
# transaction holds meanwhile (safety's state lock, which an adverse event's report waits for)
# and the run's first record's commit wait no longer, however long the backlog.
RUN_BUDGET_S = 0.25


@dataclass(frozen=True)
class Unapplied:
    """A record this service could not apply (unparseable, or its handler failed every try)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    error: str

    @property
    def record_id(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"

    def names(self) -> dict[str, str | None]:
        """Whom the record concerns, as far as it can be read: its event's id and type, and
        the scope and target it names. A hold's type fixes its scope (a trial halt stops
        everyone, whatever else its data names: a field a newer safety service added must not
        narrow it to one patient); otherwise the scope and target its data names. A record
        naming no one readable, or an arm that is not the trial's, concerns the whole trial
        ("*"): when unsure, the widest (fails closed)."""
        try:
            cloud = CloudEvent.from_bytes(self.value or b"")
        except ValueError:
            return {"event_id": None, "type": None, "scope": "trial", "target": "*"}
        data = cloud.data
        scope, target = data.get("scope"), data.get("target")
        held = CATALOGUE.get(cloud.type)
        if held is not None and issubclass(held, SafetyHold):
            scope, target = held.scope, data.get(
                {"patient": "patient_id", "arm": "arm", "trial": "trial_id"}[held.scope])
        elif not (scope in ("patient", "arm", "trial") and isinstance(target, str)):
            scope, target = None, None
            for key, named in (("patient_id", "patient"), ("arm", "arm"), ("trial_id", "trial")):
                if isinstance(data.get(key), str):
                    scope, target = named, str(data[key])
                    break
        if not isinstance(target, str) or (scope == "arm" and target not in ARMS):
            scope, target = "trial", "*"
        return {"event_id": cloud.id, "type": cloud.type, "scope": str(scope),
                "target": target}


# What a service does, in its own store, with a record of a topic it must not simply skip:
# the topics whose records it fails closed on (trial.safety for dosing, D32).
FailClosed = Callable[[Transaction, Unapplied], Awaitable[None]]

# Failures of the database or the network, not of the record: retried, never dead-lettered.
TRANSIENT = (OperationalError, InterfaceError, ConnectionError, OSError, TimeoutError)
MAX_HANDLER_ATTEMPTS = 3
ANY_TYPE = "*"  # a handler for every event type (the audit ledger)


# The producers' partitioner (the relay's aiokafka default, murmur2 like Kafka's own): which
# partition a key's records are on.
_PARTITIONER = DefaultPartitioner()
WATCH_S = 0.1  # how often a consumer looks whether its group's coordinator is lost (D64)


class PoisonRecord(Exception):
    """The record itself is bad: no retry will help."""


def _transient(exc: BaseException) -> bool:
    """A failure of the way to the record's store, never of the record: the store's own test
    (`database_unavailable`: a PostgreSQL shutting down answers a plain DBAPIError, SQLSTATE
    57P01/57P03, which must be waited out like a refused connection, never dead-lettered)."""
    return isinstance(exc, TRANSIENT) or database_unavailable(exc)


class ConsumerRunner:
    """Consumes `topics` (logical names: shared.events) as `group_id`. On the broker the topics
    and the group carry the settings' prefix (`shared.kafka.physical`: environments sharing a
    cluster share no group); a record's topic is mapped back to its logical name before anything
    looks at it (the source check, the handlers, the DLQ, D52)."""

    def __init__(self, store: EventStore, settings: Settings, topics: list[str],
                 handlers: Mapping[str, Handler], group_id: str | None = None,
                 fail_closed: Mapping[str, FailClosed] | None = None,
                 linger_ms: int = 0) -> None:
        self.store = store
        self.settings = settings
        self.topics = topics
        self.handlers = dict(handlers)
        self.fail_closed = dict(fail_closed or {})
        self.group_id = group_id or settings.service_name
        self.dlq = LazyProducer(settings)
        self.records_seen = 0
        self.handled = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.commit_offsets = True  # tests turn it off to act out a crash before the commit
        self.failpoints = Failpoints(settings)  # or a fault test kills the process there
        self._consumer: AIOKafkaConsumer | None = None  # while a session runs
        # Beside it, a client of no group that only asks the logs' ends for `caught_up`, over
        # connections of its own (D87): over the consumer's, Kafka answers it only after the
        # fetch in flight, which it holds up to `fetch_max_wait_ms` when nothing is new.
        self._ends: AIOKafkaConsumer | None = None
        self.reading = asyncio.Event()  # set once the group has given it partitions to read
        # When the group last gave this process its partitions again (monotonic): after a
        # broker restart, a rebalance or a lost session. Not the first time. Until it has
        # settled, "unknown" is not said (`shared.catchup`): the other services' relays may
        # still be publishing what they wrote while it lasted (issue 15).
        self.reassigned_at: float | None = None
        # When it last could not reach the broker: a session that failed, a catch-up look
        # that could not ask, the group's coordinator lost (a restarted Kafka may keep the
        # group, with no rebalance).
        self.trouble_at: float | None = None
        self._assignments = 0
        # The next offset of each partition this process has handled (in the database), and an
        # event set (then replaced) whenever one moves: `caught_up` waits on it.
        self.committed_here: dict[TopicPartition, int] = {}
        # Of those, what the group has not been told yet, and when it was last told (D61).
        self._uncommitted: dict[TopicPartition, int] = {}
        self._told_at = 0.0
        self._moved = asyncio.Event()
        # The last ask of the broker for each partition's committed offset (`_committed`).
        self._committed_asks: dict[
            TopicPartition, tuple[float, AIOKafkaConsumer, asyncio.Future[int | None]]] = {}
        # Records a fetch hands over at most: filed in as few commits as their reads allow (D78).
        self.max_records = 1000
        # After a fetch that found records, how long to let more gather before the next (D84):
        # at 50 randomizations a second a fetch, a transaction and a commit a record cost each
        # service about 5 ms of CPU a randomization, and a backlog's batches 0.1 ms a record.
        # Not after a full fetch (`max_records`): that is a backlog, the next one waiting (D92).
        # `caught_up` sets `_hurry` (and counts itself in `_waiters`): a request waiting for
        # this consumer never waits out a linger.
        self.linger_s = linger_ms / 1000
        self._hurry = asyncio.Event()
        self._waiters = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop`; a lost broker or group is reconnected to, and resumed from the
        last committed offsets."""
        try:
            await retry(lambda: self._session(stop), what=f"consumer {self.group_id}", stop=stop,
                        initial=0.2)
        except Stopped:
            pass
        finally:
            await self.dlq.drop()

    async def _session(self, stop: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(
            **client_options(self.settings),
            group_id=physical(self.settings, self.group_id),
            client_id=f"{self.settings.service_name}-consumer",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            metadata_max_age_ms=5000,
            session_timeout_ms=self.settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(100, self.settings.kafka_session_timeout_ms // 4),
            # How long a fetch may wait for data: a broker that waits it out (the embedded
            # one) adds it to every hop, so keep it short; Kafka answers as data arrives.
            fetch_max_wait_ms=self.settings.kafka_fetch_max_wait_ms,
            request_timeout_ms=max(self.settings.kafka_request_timeout_ms, 40_000),
        )
        ends = AIOKafkaConsumer(**client_options(self.settings),
                                client_id=f"{self.settings.service_name}-log-ends",
                                enable_auto_commit=False,
                                request_timeout_ms=self.settings.kafka_request_timeout_ms)
        try:
            if self._assignments:  # a session again, after one that failed
                self.trouble_at = time.monotonic()
            self._uncommitted = {}  # a failed session's: read again and dropped as processed
            await consumer.start()
            consumer.subscribe([physical(self.settings, topic) for topic in self.topics],
                               listener=_Assignments(self))
            await ends.start()
            self._consumer, self._ends = consumer, ends
            watch = asyncio.create_task(self._watch(consumer))
            try:
                await self._consume(consumer, stop)
            finally:
                watch.cancel()
        finally:
            self._consumer = self._ends = None
            await quietly(consumer.stop())
            await quietly(ends.stop())

    async def _watch(self, consumer: AIOKafkaConsumer) -> None:
        """Marks `trouble_at` while the group's coordinator is lost (the broker away), looking
        every `WATCH_S` beside the consume loop, not in it: that loop can sit in one offset
        commit for the whole outage (aiokafka waits out a lost coordinator inside `commit`),
        and a restarted Kafka may keep the group, with no rebalance to tell (D64)."""
        coordinator = consumer._coordinator  # aiokafka raises nothing while it reconnects
        known = False  # not before it was first found: a start is no outage
        while True:
            if getattr(coordinator, "coordinator_id", 0) is not None:
                known = True
            elif known:
                self.trouble_at = time.monotonic()
            await asyncio.sleep(WATCH_S)

    async def _consume(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=self.max_records)
            if not self.reading.is_set() and consumer.assignment():
                self.reading.set()
            # The whole fetch, every partition's records in their order one after the other,
            # files as one batch (D85): no order holds between partitions, and a record that
            # reads what an earlier one staged starts the next transaction all the same (D78).
            fetched = [record for records in batches.values() for record in records]
            if len(fetched) > 1:
                await self.handle_batch(fetched)
            elif fetched:
                await self.handle_record(fetched[0])
            if batches:
                # Only now is every record of the fetch in the database (or the DLQ).
                self.failpoints.reach(BEFORE_OFFSET_COMMIT)
                if self.commit_offsets:
                    for tp, records in batches.items():
                        self._uncommitted[tp] = self.committed_here[tp] = records[-1].offset + 1
                    self._moved.set()
                    self._moved = asyncio.Event()
            if self._uncommitted and (not batches or time.monotonic() - self._told_at >= (
                    self.settings.kafka_commit_interval_ms / 1000)):
                await self.commit_handled(consumer)
            # A full fetch is a backlog: the next is already waiting, so no linger (D92).
            if (batches and len(fetched) < self.max_records and self.linger_s
                    and not self._waiters and not stop.is_set()):
                await self._linger(stop)
        with contextlib.suppress(Exception):  # stopping: the next start resumes from here
            await self.commit_handled(consumer)

    async def _linger(self, stop: asyncio.Event) -> None:
        """Let the fetcher gather records for up to `linger_s` (it goes on fetching meanwhile),
        unless a request starts waiting for this consumer, or the consumer is stopped."""
        self._hurry.clear()
        woken = [asyncio.ensure_future(self._hurry.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(woken, timeout=self.linger_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in woken:
                waiter.cancel()

    async def commit_handled(self, consumer: AIOKafkaConsumer) -> None:
        """Tell the group the offsets handled since it was last told (D61): every interval while
        records come, at once when a fetch finds none, when stopping, and before the group takes
        partitions away (so their next reader starts where this one stopped). Not telling it
        loses nothing: the records are read again, and their processed marks drop them."""
        told, self._uncommitted = self._uncommitted, {}
        self._told_at = time.monotonic()
        if told:
            try:
                await consumer.commit(told)
            except BaseException:
                for tp, offset in told.items():  # still to tell, unless a later one came
                    self._uncommitted.setdefault(tp, offset)
                raise

    def assigned(self) -> None:
        """The group gave this process its partitions (again)."""
        self._assignments += 1
        if self._assignments > 1:
            self.reassigned_at = time.monotonic()

    def settling(self, window_s: float) -> bool:
        """Whether, less than `window_s` ago, the group gave this process its partitions again
        or it could not reach the broker."""
        last = max(self.reassigned_at or -window_s, self.trouble_at or -window_s)
        return time.monotonic() - last < window_s

    async def caught_up(self, topic: str, key: str | None, timeout: float) -> bool:
        """Whether this service's group has handled every record of `key`'s partition of
        `topic` (a logical name; every partition of it when `key` is None) that existed when
        asked, waiting up to `timeout` seconds for it to get there. False when it cannot tell in
        time (not yet in its group, the broker away, behind).

        The log's end is asked once; the group's committed offset is asked of the broker, then
        followed here as this process commits (woken at once, not polled) while the partition is
        this process's; another replica's progress is asked of the broker every 50 ms."""
        self._waiters += 1  # no linger while anyone waits (D84)
        self._hurry.set()
        try:
            return await self._caught_up(topic, key, timeout)
        finally:
            self._waiters -= 1

    async def _caught_up(self, topic: str, key: str | None, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        ends: dict[TopicPartition, int] = {}
        committed: dict[TopicPartition, int | None] = {}
        topic = physical(self.settings, topic)
        while True:
            consumer, log_ends = self._consumer, self._ends
            moved = self._moved
            try:
                partitions = sorted(consumer.partitions_for_topic(topic) or ()) if consumer else []
                if consumer is not None and log_ends is not None and partitions:
                    tps = [TopicPartition(topic, p) for p in (
                        partitions if key is None
                        else [_PARTITIONER(key.encode(), partitions, partitions)])]
                    if not ends.keys() >= set(tps):  # what existed when asked: the log's end, now
                        # Bounded by the caller's budget: with the broker away aiokafka waits
                        # out its whole request timeout (D64).
                        found = await asyncio.wait_for(log_ends.end_offsets(tps),
                                                       max(deadline - time.monotonic(), 0.01))
                        # The embedded broker answers ListOffsets with its last batch's base
                        # offset + 1, short of the end when a batch held several records; the
                        # high watermark of this process's own fetches is exact (issue 15).
                        assigned = consumer.assignment()
                        ends.update({tp: max(found[tp], consumer.highwater(tp) or 0)
                                     if tp in assigned else found[tp] for tp in tps})
                    if all(await asyncio.gather(*(  # the partitions asked together
                            self._handled(consumer, tp, ends[tp], committed, deadline)
                            for tp in tps))):
                        return True
            except TimeoutError:  # the budget ran out during a look: cannot tell in time
                return False
            except Exception as exc:  # the group or the broker in flux: try again until the end
                self.trouble_at = time.monotonic()
                log.debug("consumer %s: catching up on %s unknown: %r", self.group_id, topic, exc)
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), min(0.05, left))

    async def _handled(self, consumer: AIOKafkaConsumer, tp: TopicPartition, end: int,
                       committed: dict[TopicPartition, int | None], deadline: float) -> bool:
        """Whether the group's committed offset of `tp` has reached `end` (`committed` keeps
        what the broker said across one `caught_up`'s looks). The group is asked even when the
        partition is empty: the answer comes once the group's coordinator answers, which a
        consumer still joining its group waits for (and tests of a rebalance count on)."""
        assigned = tp in consumer.assignment()
        here = self.committed_here.get(tp) if assigned else None
        if end > 0 and here is not None and here >= end:
            return True  # this process committed past the end itself: no need to ask the group
        if committed.get(tp) is None or not assigned:
            committed[tp] = await asyncio.wait_for(
                self._committed(consumer, tp), max(deadline - time.monotonic(), 0.01))
        here = self.committed_here.get(tp)  # it may have moved while the group was asked
        if here is not None and assigned:
            committed[tp] = max(committed[tp] or 0, here)
        reached = committed[tp]
        return end == 0 or (reached is not None and reached >= end)

    async def _committed(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
        """The group's committed offset of `tp`, asked of the broker at most once per 50 ms
        however many requests wait (issue 15: after a restart, dozens of requests each asking
        every 50 ms flooded the one client that must also rejoin the group and fetch). A value
        asked a moment ago can only be lower than now's: a waiter waits longer, never less."""
        now = time.monotonic()
        asked = self._committed_asks.get(tp)
        if asked is None or asked[1] is not consumer or (
                now - asked[0] > 0.05 and asked[2].done()):
            asked = (now, consumer, asyncio.ensure_future(consumer.committed(tp)))
            self._committed_asks[tp] = asked
        return await asyncio.shield(asked[2])

    @traced_record  # its span and log line (shared/tracing.py)
    async def handle_record(self, record: ConsumerRecord) -> None:
        """Handle one record to completion: processed, skipped, or dead-lettered.

        A failure of the database or the network is waited out, however long (the record is
        fine); a handler that fails otherwise gets a few tries, then the record goes to the DLQ.
        """
        self.records_seen += 1
        where = f"consumer {self.group_id} at {record.topic}:{record.partition}:{record.offset}"

        async def until_stored() -> None:
            await retry(lambda: on_conflict_again(lambda: self._process(record)), what=where,
                        retry_if=_transient)

        try:
            await retry(until_stored, what=where, attempts=MAX_HANDLER_ATTEMPTS,
                        retry_if=lambda e: not isinstance(e, PoisonRecord))
        except PoisonRecord as exc:
            await self._dead_letter(record, str(exc))
        except Exception as exc:  # a handler bug or a constraint, every try
            await self._dead_letter(record, f"{type(exc).__name__}: {exc}")

    @traced_batch  # its span and log line (shared/tracing.py)
    async def handle_batch(self, records: list[ConsumerRecord]) -> None:
        """A fetch's records, each partition's in order, in as few transactions as their reads allow
        (D78): each record's work joins the transaction of the records before it unless it reads
        what they staged (`StagedRead`); it then starts the next one. Anything but a database or
        network failure (which is waited out, like a record's) sends the records not yet
        committed back to one transaction a record, so a poison record or a failing handler goes
        to the DLQ alone and the rest are filed as they would have been."""
        first, last = records[0], records[-1]  # of a fetch: perhaps of several partitions
        where = (f"consumer {self.group_id} at {first.topic}:{first.partition}:{first.offset}"
                 f" to {last.topic}:{last.partition}:{last.offset} ({len(records)} records)")
        done, outcomes = 0, []  # records[:done] are filed; each one's handled-or-duplicate
        try:
            parsed = [self._parse(record) for record in records]
            while done < len(records):
                done, applied = await retry(
                    functools.partial(on_conflict_again, functools.partial(
                        self._process_run, records, parsed, done)),
                    what=where, retry_if=_transient)
                outcomes += applied
                self.handled += sum(applied)
                self.duplicates += len(applied) - sum(applied)
        except Exception as exc:
            log.warning("%s: the batch failed (%r), one record at a time from offset %s",
                        where, exc, records[done].offset)
            self.records_seen += done
            for record in records[done:]:
                await self.handle_record(record)
            return
        noted_outcomes(outcomes)
        self.records_seen += len(records)

    async def _process_run(self, records: list[ConsumerRecord],
                           parsed: list[tuple[Handler, Delivery] | None], start: int
                           ) -> tuple[int, list[bool]]:
        """From `parsed[start]`, as many records as can share one transaction, committed: where
        the run stopped, and each applied record's outcome (handled, or a duplicate)."""
        applied: list[bool] = []
        end = looked_up = start
        window = PREFETCH_FIRST
        budget = asyncio.get_running_loop().time() + RUN_BUDGET_S
        async with self.store.transaction() as tx:
            while end < len(parsed):
                item = parsed[end]
                if item is None:  # no handler of this service wants it
                    end += 1
                    continue
                if end >= looked_up:  # one statement for the next records' ids
                    looked_up, window = end + window, min(2 * window, PREFETCH_MOST)
                    await tx.prefetch(self.group_id, [p[1].event.id for p in
                                                      parsed[end:looked_up] if p is not None])
                mark = tx.savepoint()
                try:
                    with record_in_batch(records[end], self.group_id, item[1].event.id):
                        applied.append(await self._apply(tx, *item))
                except StagedRead:
                    if not applied:
                        raise  # it reads its own staged writes: a handler bug, not a batch's
                    tx.rollback(mark)  # it goes first in the next transaction
                    break
                end += 1
                if asyncio.get_running_loop().time() >= budget:
                    break  # commit: what the run holds (safety's state lock) waits no longer
        return end, applied

    @noted_parse  # what the log line reports
    def _parse(self, record: ConsumerRecord) -> tuple[Handler, Delivery] | None:
        """The record's handler and what it receives; None when no handler wants it."""
        try:
            event = CloudEvent.from_bytes(record.value or b"")
        except ValidationError as exc:
            raise PoisonRecord(f"not a CloudEvent: {_short(exc)}") from exc
        topic = logical(self.settings, record.topic)
        if not may_publish(event.source, topic):
            # Forged, or published by mistake: never applied, never filed (D42).
            raise PoisonRecord(f"source {event.source} may not publish to {topic}")
        handler = self.handlers.get(event.type) or self.handlers.get(ANY_TYPE)
        if handler is None:
            return None  # not ours to handle; committing past it loses nothing
        data: EventData | None = None
        if event.type in CATALOGUE:
            try:
                data = event.typed_data()
            except ValidationError as exc:
                raise PoisonRecord(f"invalid {event.type} data: {_short(exc)}") from exc
        elif event.type in self.handlers:
            raise PoisonRecord(f"event type {event.type} is not in the catalogue")
        return handler, Delivery(event, data, topic)

    async def _apply(self, tx: Transaction, handler: Handler, delivery: Delivery) -> bool:
        """Handle and mark one delivery in `tx`; False when it was processed before."""
        if marks_by_event_id(handler):  # its event is its mark (D89)
            if await tx.has_event(delivery.event.id):
                return False
            await handler(tx, delivery)
            return True
        if await tx.was_processed(self.group_id, delivery.event.id):
            return False
        await handler(tx, delivery)
        await tx.mark_processed(self.group_id, delivery.event.id, delivery.topic)
        return True

    async def _process(self, record: ConsumerRecord) -> None:
        parsed = self._parse(record)
        if parsed is None:
            return
        async with self.store.transaction() as tx:
            # Whether it was processed, and whether its id is stored (which the ledger and
            # safety ask), in the one statement a batch uses.
            await tx.prefetch(self.group_id, [parsed[1].event.id])
            applied = await self._apply(tx, *parsed)
        if applied:
            self.handled += 1
        else:
            self.duplicates += 1

    async def _dead_letter(self, record: ConsumerRecord, error: str) -> None:
        log.error("consumer %s: %s:%s:%s to DLQ: %s", self.group_id, record.topic,
                  record.partition, record.offset, error)
        topic = logical(self.settings, record.topic)  # the DLQ's header names it so (D52)
        headers = [
            ("dlq_error", error.encode()[:2000]),
            ("dlq_consumer", self.group_id.encode()),
            ("dlq_topic", topic.encode()),
            ("dlq_partition", str(record.partition).encode()),
            ("dlq_offset", str(record.offset).encode()),
        ]

        # The offset is not committed until the DLQ has the record.
        await retry(lambda: self.dlq.send_and_wait(physical(self.settings, dlq_topic(topic)),
                                                   record.value, record.key, headers),
                    what=f"consumer {self.group_id}: DLQ publish", initial=0.2)
        self.dead_lettered += 1
        closed = self.fail_closed.get(topic)
        if closed is not None:
            # Not skipped: the service records, in its own store, that it could not apply it,
            # and refuses what the record may concern until an operator resolves it (D32).
            unapplied = Unapplied(topic, record.partition, record.offset, record.key,
                                  record.value, error)

            async def record_it() -> None:
                async with self.store.transaction() as tx:
                    await closed(tx, unapplied)

            # Run again, as every command is, when what it read moved before its commit (the
            # holds, by another replica's consumer or an operator): that must not end the
            # session and send the record to the DLQ a second time.
            await retry(lambda: on_conflict_again(record_it),
                        what=f"consumer {self.group_id}: fail closed on {unapplied.record_id}",
                        retry_if=lambda exc: _transient(exc) or isinstance(exc, ConcurrencyError))


def _short(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])


class _Assignments(ConsumerRebalanceListener):
    """Tells the runner each time the group hands it its partitions."""

    def __init__(self, runner: ConsumerRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: object) -> None:
        consumer = self.runner._consumer
        if consumer is not None and self.runner._uncommitted:
            try:
                await self.runner.commit_handled(consumer)
            except Exception as exc:  # the group moved on: the next reader reads them again
                log.warning("consumer %s: offsets not committed before a rebalance: %r",
                            self.runner.group_id, exc)

    async def on_partitions_assigned(self, assigned: object) -> None:
        self.runner.assigned()
