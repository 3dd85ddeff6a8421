"""The relay: publishes committed events to Kafka in position order, at least once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer

from shared.events import model_for
from shared.settings import Settings
from shared.store import EventStore, RecordedEvent

log = logging.getLogger(__name__)


class Relay:
    """Reads events after its stored checkpoint, publishes them, then moves the checkpoint.

    A crash between publishing and saving the checkpoint republishes; consumers drop duplicates
    by event id. While the broker is down the relay backs off and retries the same batch; the
    service's writes are unaffected, since they only touch the database.
    """

    def __init__(self, store: EventStore, settings: Settings,
                 producer_factory: Callable[[], AIOKafkaProducer] | None = None,
                 name: str = "kafka") -> None:
        self.store = store
        self.settings = settings
        self.name = name
        self.source = f"/services/{settings.service_name}"
        self._factory = producer_factory or (lambda: _default_producer(settings))
        self._producer: AIOKafkaProducer | None = None
        self.published_position = 0
        self.healthy = True  # false while the last publish attempt failed

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.1
        while not stop.is_set():
            try:
                moved = await self.publish_pending()
                delay = 0.1
                if not moved:
                    await self._wait(stop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker or the database failed: retry the same batch
                self.healthy = False
                log.warning("relay %s: publish failed, retrying in %.1fs: %r", self.name, delay, exc)
                await self._drop_producer()
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 5.0)
        await self._drop_producer()

    async def _wait(self, stop: asyncio.Event) -> None:
        waiter = asyncio.ensure_future(
            self.store.wait_for_commit(self.settings.relay_poll_interval_s))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, stopper):
            task.cancel()

    async def publish_pending(self) -> int:
        """Publish one batch after the checkpoint; returns how many events it published."""
        checkpoint = await self.store.checkpoint(self.name)
        batch = await self.store.read_all(after=checkpoint, limit=self.settings.relay_batch_size)
        if not batch:
            return 0
        producer = await self._ensure_producer()
        # send() queues in order; the client keeps one request in flight per broker, so the
        # records of one partition land in the order queued.
        futures = [await producer.send(**self._record(event)) for event in batch]
        await asyncio.gather(*futures)
        async with self.store.transaction() as tx:
            await tx.save_checkpoint(self.name, batch[-1].position)
        self.published_position = batch[-1].position
        self.healthy = True
        return len(batch)

    def _record(self, event: RecordedEvent) -> dict[str, Any]:
        cloud = event.to_cloudevent(self.source)
        return {
            "topic": model_for(event.type).topic,
            "value": cloud.to_bytes(),
            "key": cloud.subject.encode(),
            "headers": [("content-type", b"application/cloudevents+json"),
                        ("ce_type", event.type.encode())],
        }

    async def _ensure_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = self._factory()
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await producer.stop()
            except Exception as exc:  # stopping a broken client must not stop the relay
                log.debug("relay %s: producer stop failed: %r", self.name, exc)


def _default_producer(settings: Settings) -> AIOKafkaProducer:
    from shared.kafka import make_producer

    return make_producer(settings)
