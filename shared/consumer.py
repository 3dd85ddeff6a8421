"""The consumer runner: one consumer group per service, handled exactly once in effect.

For each record: parse the CloudEvent, and in one database transaction skip it if its event id
was processed already, else run the handler and record the id. The Kafka offset is committed
only after that transaction commits, so a crash in between redelivers, and the redelivery
changes nothing. A record that cannot be parsed or handled goes to `<topic>.dlq` with the error,
and the consumer moves on: one bad record never stops the stream nor loops a service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from shared.events import CATALOGUE, CloudEvent, EventData, dlq_topic
from shared.settings import Settings
from shared.store import EventStore, Transaction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """What a handler receives: the envelope, its typed data, and where it came from."""

    event: CloudEvent
    data: EventData | None  # None only for a catch-all ("*") handler and an unknown type
    topic: str


Handler = Callable[[Transaction, Delivery], Awaitable[None]]

# Failures of the database or the network, not of the record: retried, never dead-lettered.
TRANSIENT = (OperationalError, InterfaceError, ConnectionError, OSError, TimeoutError)
MAX_HANDLER_ATTEMPTS = 3
ANY_TYPE = "*"  # a handler for every event type (the audit ledger)


class PoisonRecord(Exception):
    """The record itself is bad: no retry will help."""


class ConsumerRunner:
    def __init__(self, store: EventStore, settings: Settings, topics: list[str],
                 handlers: Mapping[str, Handler], group_id: str | None = None,
                 producer_factory: Callable[[], AIOKafkaProducer] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.topics = topics
        self.handlers = dict(handlers)
        self.group_id = group_id or settings.service_name
        self._producer_factory = producer_factory
        self._producer: AIOKafkaProducer | None = None
        self.records_seen = 0
        self.handled = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.commit_offsets = True  # tests turn it off to act out a crash before the commit

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.2
        while not stop.is_set():
            consumer = AIOKafkaConsumer(
                *self.topics,
                bootstrap_servers=self.settings.kafka_bootstrap_servers,
                group_id=self.group_id,
                client_id=f"{self.settings.service_name}-consumer",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                metadata_max_age_ms=5000,
                # How long a fetch may wait for data: a broker that waits it out (the embedded
                # one) adds it to every hop, so keep it short; Kafka answers as data arrives.
                fetch_max_wait_ms=self.settings.kafka_fetch_max_wait_ms,
                request_timeout_ms=max(self.settings.kafka_request_timeout_ms, 40_000),
            )
            try:
                await consumer.start()
                delay = 0.2
                await self._consume(consumer, stop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker gone or group trouble: reconnect and resume
                log.warning("consumer %s: %r; reconnecting in %.1fs", self.group_id, exc, delay)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 5.0)
            finally:
                await _quietly(consumer.stop())
        if self._producer is not None:
            await _quietly(self._producer.stop())

    async def _consume(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=200)
            for tp, records in batches.items():
                for record in records:
                    await self.handle_record(record)
                # Only now is every record of the batch in the database (or the DLQ).
                if self.commit_offsets:
                    await consumer.commit({tp: records[-1].offset + 1})

    async def handle_record(self, record: ConsumerRecord) -> None:
        """Handle one record to completion: processed, skipped, or dead-lettered."""
        self.records_seen += 1
        attempt, delay = 0, 0.1
        while True:
            attempt += 1
            try:
                await self._process(record)
                return
            except TRANSIENT as exc:
                # The record is fine; the database is not. Keep it, retry until it comes back.
                log.warning("consumer %s: transient failure at %s:%s:%s, retrying: %r",
                            self.group_id, record.topic, record.partition, record.offset, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                attempt = 0
            except PoisonRecord as exc:
                await self._dead_letter(record, str(exc))
                return
            except Exception as exc:  # a handler bug or a constraint: a few tries, then DLQ
                if isinstance(exc, DBAPIError) and exc.connection_invalidated:
                    continue
                if attempt >= MAX_HANDLER_ATTEMPTS:
                    await self._dead_letter(record, f"{type(exc).__name__}: {exc}")
                    return
                log.warning("consumer %s: handler failed (attempt %d): %r",
                            self.group_id, attempt, exc)

    async def _process(self, record: ConsumerRecord) -> None:
        try:
            event = CloudEvent.from_bytes(record.value or b"")
        except ValidationError as exc:
            raise PoisonRecord(f"not a CloudEvent: {_short(exc)}") from exc
        handler = self.handlers.get(event.type) or self.handlers.get(ANY_TYPE)
        if handler is None:
            return  # not ours to handle; committing past it loses nothing
        data: EventData | None = None
        if event.type in CATALOGUE:
            try:
                data = event.typed_data()
            except ValidationError as exc:
                raise PoisonRecord(f"invalid {event.type} data: {_short(exc)}") from exc
        elif event.type in self.handlers:
            raise PoisonRecord(f"event type {event.type} is not in the catalogue")
        async with self.store.transaction() as tx:
            if await tx.was_processed(self.group_id, event.id):
                self.duplicates += 1
                return
            await handler(tx, Delivery(event, data, record.topic))
            await tx.mark_processed(self.group_id, event.id, record.topic)
        self.handled += 1

    async def _dead_letter(self, record: ConsumerRecord, error: str) -> None:
        log.error("consumer %s: %s:%s:%s to DLQ: %s", self.group_id, record.topic,
                  record.partition, record.offset, error)
        headers = [
            ("dlq_error", error.encode()[:2000]),
            ("dlq_consumer", self.group_id.encode()),
            ("dlq_topic", record.topic.encode()),
            ("dlq_partition", str(record.partition).encode()),
            ("dlq_offset", str(record.offset).encode()),
        ]
        delay = 0.2
        while True:  # the offset is not committed until the DLQ has the record
            try:
                producer = await self._dlq_producer()
                await producer.send_and_wait(dlq_topic(record.topic), value=record.value,
                                             key=record.key, headers=headers)
                self.dead_lettered += 1
                return
            except Exception as exc:
                log.warning("consumer %s: DLQ publish failed, retrying: %r", self.group_id, exc)
                if self._producer is not None:
                    await _quietly(self._producer.stop())
                    self._producer = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _dlq_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            from shared.kafka import make_producer

            producer = (self._producer_factory or (lambda: make_producer(self.settings)))()
            await producer.start()
            self._producer = producer
        return self._producer


def _short(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])


async def _quietly(awaitable: Awaitable[object]) -> None:
    try:
        await awaitable
    except Exception as exc:  # closing a client that already failed
        log.debug("close failed: %r", exc)
