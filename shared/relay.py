"""The relay: publishes committed events to Kafka in position order, each once.

Once, not merely at least once (issue 15): only the replica holding the store's leadership for
the relay publishes (`shared.leader`), and a relay that starts, takes over, or failed mid-batch
first reads what the broker already holds of its own after its checkpoint (`_resume`), so a batch
the broker kept before the checkpoint could be saved is not sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.events import PUBLISHERS, TOPICS
from shared.kafka import (
    LazyProducer,
    broker_view,
    client_options,
    connections,
    drain,
    ensure_topics,
    known_partitions,
    physical,
    stop_within,
)
from shared.leader import Leadership
from shared.retry import Stopped, retry
from shared.settings import Settings
from shared.store import EventStore, RecordedEvent, Written, written
from shared.timing import timed
from shared.tracing import publishing

log = logging.getLogger(__name__)


class TopicsForgotten(Exception):
    """The broker acknowledged a batch for topics it does not have: nothing was kept."""


class BrokerChanged(Exception):
    """The batch went to a broker cluster other than the checkpoint's: publish from its start."""


class PassStalled(Exception):
    """A pass did not end within its budget: abandoned, and started again on fresh clients."""


class Relay:
    """Reads events after its stored checkpoint, publishes them, then moves the checkpoint
    (beside the next batches, D88).

    With the checkpoint it saves, per partition, the offset after the last record it published
    there. A crash between publishing and saving the checkpoint leaves records on the broker
    past those offsets: `_resume` reads them (its own, by source) and the batch is sent again
    without them. Consumers still drop duplicates by event id, the second line. While the broker
    is down the relay backs off and retries the same batch; the service's writes are unaffected,
    since they only touch the database. Only the holder of the store's leadership for the relay's
    name publishes; the other replicas wait to take over.
    """

    def __init__(self, store: EventStore, settings: Settings, name: str = "kafka") -> None:
        self.store = store
        self.settings = settings
        self.name = name
        self.source = f"/services/{settings.service_name}"
        self.producer = LazyProducer(settings)
        self.published_position = 0
        self._moved = asyncio.Event()  # set (then replaced) whenever published_position moves
        self.healthy = True  # false while the last publish attempt failed
        self.failed_at: float | None = None  # when a publish attempt last failed (monotonic)
        # Answers that waited for their events (D56): on the broker in time, or sent before.
        self.answers = {"published": 0, "before_published": 0}
        self._cluster: str | None = None  # the broker cluster's id, as last seen
        # The producer's connections when a metadata request last showed the broker, and the
        # topics it had then (D86): while those connections carry the acknowledgements, the
        # broker is the process that was seen, and a batch on those topics needs no new look.
        self._seen: tuple[dict[Any, Any], set[str]] | None = None
        self._sent_to: set[str] = set()  # every topic a batch went to: each look asks for all
        self._delivery_timeout_s = 3 * settings.kafka_request_timeout_ms / 1000
        # A pass's budget (D72): more than its bounded steps take together (a resume's drain,
        # 2 x delivery, is the longest), so only a wedged client reaches it.
        self.pass_budget_s = 4 * self._delivery_timeout_s
        self.leadership = Leadership(store, f"relay-{name}")
        self.leading = False  # this replica publishes (health detail)
        self._resumed = False  # the broker's tail has been read since the last start or failure
        self._on_broker: set[str] = set()  # ids after the checkpoint the broker already holds
        # The checkpoint moves behind the publishing, not in its way (D88): a pass reads after
        # the position its last batch reached on the broker (`_through`, this checkpoint name's;
        # forgotten at every resume, which starts from the saved checkpoint again), while one
        # transaction at a time saves the latest checkpoints (`_unsaved`) beside it.
        self._through: tuple[str, int] | None = None
        self._unsaved: dict[str, int] = {}
        self._saving: asyncio.Task[None] | None = None
        # Where its records can be: the topics the service owns (a name the table does not know,
        # a test's, may publish anywhere).
        self._topics = sorted(t for t, owners in PUBLISHERS.items() if self.source in owners
                              ) or sorted(TOPICS)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                moved = await retry(self._publish_or_drop, what=f"relay {self.name}", stop=stop,
                                    wake=self._committed_here)
                # A batch short of full took everything there was: what commits after its read
                # wakes `_wait` at once (D84), so no pass just to find nothing.
                if moved < self.settings.relay_batch_size:
                    await self._wait(stop)
        except Stopped:
            pass
        finally:
            with contextlib.suppress(Exception):  # what it cannot save, a resume reads again
                await asyncio.wait_for(self.checkpoint_saved(), self._delivery_timeout_s)
            if self._saving is not None:
                self._saving.cancel()
            await self.producer.drop()
            await self.leadership.release()

    async def _publish_or_drop(self) -> int:
        """One pass, watched (D72): a pass still running after `pass_budget_s` is cancelled and
        fails like any other, its producer dropped, and where it stood goes to the log. An
        aiokafka client can wait for ever on a broker that went away under it (aio-libs/
        aiokafka#712); without this the relay stayed "healthy", published nothing and said
        nothing, and every answer waited its full `answer_after_publish_s`."""
        task = asyncio.ensure_future(self.publish_pending())
        try:
            done, _ = await asyncio.wait({task}, timeout=self.pass_budget_s)
            if not done:
                where = awaiting(task)
                task.cancel()
                await asyncio.wait({task}, timeout=self._delivery_timeout_s)
                log.error("relay %s: a pass did not end in %g s; abandoned, starting again on "
                          "fresh clients. It was waiting in:\n%s", self.name, self.pass_budget_s,
                          "\n".join(where))
                raise PassStalled(f"a pass did not end in {self.pass_budget_s:g} s")
            return task.result()
        except Exception:  # the broker or the database failed: retry the same batch
            self.healthy = False
            self.failed_at = time.monotonic()
            self._resumed = False  # what reached the broker is unknown: read its tail again
            self._seen = None
            await self.producer.drop()  # (`using` drops it too, but not after a cancel)
            raise
        finally:
            if not task.done():  # the relay itself stopping
                task.cancel()

    async def _committed_here(self) -> None:
        """A commit by this process, after a floor of 0.2 s (retries never spin): the database
        works again, and the request that made it waits for its events (D56)."""
        await asyncio.sleep(0.2)
        await self.store.wait_for_commit(3600)

    async def _wait(self, stop: asyncio.Event) -> None:
        waiter = asyncio.ensure_future(
            self.store.wait_for_commit(self.settings.relay_poll_interval_s))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, stopper):
            task.cancel()

    async def publish_pending(self) -> int:
        """Publish one batch after the checkpoint; returns how many events it published.

        The checkpoint is the broker cluster's (`checkpoint_name`): a broker that is not the one
        published to before (the embedded broker restarted empty, a Kafka cluster rebuilt) has a
        cluster id of its own, so a checkpoint at 0, and gets the whole history again; consumers
        drop what they have seen, by event id (issue 15)."""
        self._save_checkpoint()
        if not await self.leadership.hold():
            if self.leading:
                log.warning("relay %s: no longer the leader; another replica publishes", self.name)
            self.leading = self._resumed = False
            return 0
        if not self.leading:
            log.info("relay %s: this replica publishes now", self.name)
        self.leading = True
        async with self.producer.using() as producer:
            if self._cluster is None:
                self._cluster, _ = await broker_view(producer.client, [])
            name = self.checkpoint_name
            if not self._resumed:
                await self._resume(producer)
            through = self._through[1] if self._through and self._through[0] == name else None
            batch = await self.store.pending(name, self.settings.relay_batch_size, through)
            if not batch:
                return 0
            # send() queues in order; the client keeps one request in flight per broker, so the
            # records of one partition land in the order queued. The wait is bounded: a
            # producer connected before a broker restart can retry a batch forever without
            # failing it (seen with aiokafka 0.14), and a fresh producer recovers.
            fresh = [event for event in batch if event.event_id not in self._on_broker]
            records = [self._record(event) for event in fresh]
            with publishing(fresh, records, self.settings.service_name):  # traceparent headers
                futures = [await producer.send(**record) for record in records]
                sent = await asyncio.wait_for(asyncio.gather(*futures), self._delivery_timeout_s)
            await self._confirm(producer, {r["topic"] for r in records})
        # The batch is on the broker: the answers waiting for it may leave now, before the
        # checkpoint's commit (a write and an fsync they need not wait for). Should that commit
        # fail, the batch is still on the broker; the retry resumes from the broker's tail and
        # sends none of it again.
        self.published_position = batch[-1].position
        self.healthy = True
        self._moved.set()
        self._moved = asyncio.Event()
        # The checkpoint and, per partition, the offset after our last record there: saved
        # beside the next passes (D88). Until saved, a resume reads them from the broker's tail.
        self._through = (name, batch[-1].position)
        self._later(name, batch[-1].position)
        for meta in sent:
            self._later(_offset_name(name, meta.topic, meta.partition), meta.offset + 1)
        self._save_checkpoint()
        self._on_broker.difference_update(event.event_id for event in batch)
        return len(batch)

    def _later(self, key: str, value: int) -> None:
        self._unsaved[key] = max(value, self._unsaved.get(key, 0))

    def _save_checkpoint(self) -> None:
        """Start saving the checkpoints not saved yet, unless a save is under way (it saves
        what came meanwhile next). A save that failed fails the pass that finds it, as the
        pass that made it would have: the relay then retries, resuming from what was saved."""
        if self._saving is not None and self._saving.done():
            saving, self._saving = self._saving, None
            saving.result()
        if self._saving is None and self._unsaved:
            self._saving = asyncio.ensure_future(self._save_unsaved())

    async def _save_unsaved(self) -> None:
        while self._unsaved:
            unsaved, self._unsaved = self._unsaved, {}
            try:
                async with self.store.transaction() as tx:
                    for key, value in unsaved.items():
                        await tx.save_checkpoint(key, value)  # never back (max at commit)
            except BaseException:
                for key, value in unsaved.items():
                    self._later(key, value)
                raise

    async def checkpoint_saved(self) -> None:
        """Until every batch on the broker has its checkpoint saved (or the save has failed)."""
        while self._saving is not None or self._unsaved:
            if self._saving is None:
                self._save_checkpoint()
            saving = self._saving
            assert saving is not None
            await asyncio.wait({saving})
            self._save_checkpoint()  # raises what it failed with

    async def _confirm(self, producer: AIOKafkaProducer, topics: set[str]) -> None:
        """The checkpoint moves only if the broker that acknowledged the batch is the one the
        checkpoint is for, and has every topic of the batch: the embedded broker acknowledges
        records for a topic it does not have (one a restart made it forget, to a producer
        connected before, D36). Else the batch is sent again. One metadata request tells, unless
        the acknowledgements came over the very connections of the last such request, to the
        topics it showed (D86): a restarted broker is a new connection."""
        if self._seen is not None:
            before, present = self._seen
            now = connections(producer.client)
            if (topics <= present and now.keys() == before.keys()
                    and all(now[key] is conn for key, conn in before.items())):
                return
        self._seen = None
        self._sent_to |= topics
        cluster, present = await broker_view(producer.client, self._sent_to)
        if cluster != self._cluster:
            self._cluster = cluster
            raise BrokerChanged(f"the broker is now cluster {cluster}: publishing from the start")
        missing = topics - present
        if missing:
            await ensure_topics(self.settings, sorted(missing))
            raise TopicsForgotten(f"the broker had no {', '.join(sorted(missing))}")
        self._seen = (connections(producer.client), present)

    async def published(self, position: int, timeout: float) -> bool:
        """Wait up to `timeout` seconds until the event at `position` is on the broker (D56).
        On the replica that publishes, woken as its batches land; on another replica, by the
        store's checkpoint, looked at every 50 ms. False at once while this replica publishes
        and its broker is failing: the write stands, and the wait would only delay its answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            moved = self._moved
            if self.published_position >= position:
                return self._answered(True)
            if self.leading and not self.healthy:
                return self._answered(False)
            if not self.leading and await self.store.published_through(self.name) >= position:
                return self._answered(True)
            left = deadline - loop.time()
            if left <= 0:
                return self._answered(False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), left if self.leading else min(left, 0.05))

    def _answered(self, published: bool) -> bool:
        self.answers["published" if published else "before_published"] += 1
        return published

    async def _resume(self, producer: AIOKafkaProducer) -> None:
        """Learn which events after the checkpoint the broker already holds: on every partition
        of the relay's topics, the records after the offset saved with the checkpoint whose
        source is this service. A batch published before a crash (or a failed delivery wait,
        or another replica's last batch before it lost the leadership) is thus not sent again.

        Where no offset was saved (a checkpoint from before this was kept, or a partition first
        published to by batches whose checkpoint was not saved yet, D88) the last
        `4 x relay_batch_size` records of the partition are read: more than one unsaved batch
        can leave there. A new broker cluster has a checkpoint at 0: read from its start."""
        # Our own records still queued land before the tail is read; from now on a pass reads
        # after the saved checkpoint, not after the last batch this process saw acknowledged.
        await asyncio.wait_for(producer.flush(), self._delivery_timeout_s)
        self._through = None
        with contextlib.suppress(Exception):  # what it could not save, the tail shows
            await asyncio.wait_for(self.checkpoint_saved(), self._delivery_timeout_s)
        name = self.checkpoint_name
        at_start = await self.store.checkpoint(name) == 0
        consumer = AIOKafkaConsumer(**client_options(self.settings), group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    fetch_max_wait_ms=50,
                                    request_timeout_ms=self.settings.kafka_request_timeout_ms,
                                    client_id=f"{self.settings.service_name}-relay-resume")
        await consumer.start()
        await asyncio.sleep(0)  # aiokafka: let its no-group task start, or stop() re-raises its cancel
        seen: set[str] = set()
        try:
            partitions = [tp for topic in self._topics
                          for tp in await known_partitions(consumer,
                                                           physical(self.settings, topic))]
            if not partitions:
                self._on_broker, self._resumed = seen, True
                return
            consumer.assign(partitions)
            for tp in partitions:
                saved = await self.store.checkpoint(_offset_name(name, tp.topic, tp.partition))
                consumer.seek(tp, saved if saved or at_start else await _tail(
                    consumer, tp, 4 * self.settings.relay_batch_size))
            async for records in drain(consumer, partitions, self._delivery_timeout_s * 2):
                for record in records:
                    envelope = _source_and_id(record.value) if record.value else None
                    if envelope is not None and envelope[0] == self.source:
                        seen.add(envelope[1])
        finally:
            await stop_within(consumer.stop(), self._delivery_timeout_s)
        if seen:
            log.warning("relay %s: %d events after the checkpoint were already on the broker; "
                        "not sending them again", self.name, len(seen))
        self._on_broker, self._resumed = seen, True

    @property
    def checkpoint_name(self) -> str:
        """This relay's checkpoint on the broker cluster it publishes to."""
        return f"{self.name}@{self._cluster}" if self._cluster else self.name

    def _record(self, event: RecordedEvent) -> dict[str, Any]:
        payload = event.payload().published()
        cloud = event.to_cloudevent(self.source, payload)
        return {
            "topic": physical(self.settings, payload.topic_of()),
            "value": cloud.to_bytes(),
            "key": cloud.subject.encode(),
            "headers": [("content-type", b"application/cloudevents+json"),
                        ("ce_type", event.type.encode())],
        }


def awaiting(task: asyncio.Future[Any]) -> list[str]:
    """Where a suspended task waits: each coroutine of its await chain, outermost first, as
    `file:line in function`, down to the future it waits on."""
    where: list[str] = []
    coro: Any = task.get_coro() if isinstance(task, asyncio.Task) else None
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            where.append(f"  on {type(coro).__name__}")
            break
        where.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return where


def _offset_name(checkpoint: str, topic: str, partition: int) -> str:
    """The checkpoint row that keeps, for the relay checkpoint `checkpoint`, the offset after
    its last record on one partition."""
    return f"{checkpoint}#{topic}/{partition}"


def _source_and_id(value: bytes) -> tuple[str, str] | None:
    """A record's CloudEvent source and id, or None for a record that is not one of ours."""
    try:
        envelope = json.loads(value)
    except ValueError:
        return None
    if not isinstance(envelope, dict):
        return None
    source, event_id = envelope.get("source"), envelope.get("id")
    return (source, event_id) if isinstance(source, str) and isinstance(event_id, str) else None


async def _tail(consumer: AIOKafkaConsumer, tp: TopicPartition, records: int) -> int:
    """Where the last `records` records of the partition start (by its ListOffsets end, which
    on the embedded broker falls short: then more is read, never less)."""
    end = (await consumer.end_offsets([tp]))[tp]
    return max(0, end - records)


class AnswerWhenPublished:
    """A write's answer (a POST's 2xx) leaves once the events it appended are on the broker,
    waiting up to `answer_after_publish_s` (D56). A site acts on the answer at once (a dose
    right after the randomization, a dose refused right after a withdrawal): the service that
    learns of the fact from Kafka must know it by then, and "the consumer has read what the
    broker holds" (D33, D37) only says so if the broker holds it. Past the wait, or while the
    broker is away, the answer goes out anyway: the write is committed, the relay publishes it
    when it can, and the other services answer 503 `not_caught_up` meanwhile, never a wrong
    yes. Runs inside the idempotency middleware: a key's answer is kept once published."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        mark = Written()
        token = written.set(mark)

        async def when_published(message: Message) -> None:
            if (message["type"] == "http.response.start" and mark.position
                    and 200 <= message["status"] < 300):
                runtime = getattr(scope["app"].state, "runtime", None)
                relay = runtime.relay if runtime is not None else None
                settings = runtime.settings if runtime is not None else None
                if (relay is not None and settings is not None and settings.relay_enabled
                        and settings.answer_after_publish_s > 0):
                    waited = time.perf_counter()
                    await relay.published(mark.position, settings.answer_after_publish_s)
                    timed("publish", time.perf_counter() - waited)  # Server-Timing (D90)
            await send(message)

        try:
            await self.app(scope, receive, when_published)
        finally:
            written.reset(token)
