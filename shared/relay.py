"""The relay: publishes committed events to Kafka in position order, at least once."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from shared.kafka import LazyProducer, broker_view, ensure_topics
from shared.retry import Stopped, retry
from shared.settings import Settings
from shared.store import EventStore, RecordedEvent
from shared.tracing import publishing

log = logging.getLogger(__name__)


class TopicsForgotten(Exception):
    """The broker acknowledged a batch for topics it does not have: nothing was kept."""


class BrokerChanged(Exception):
    """The batch went to a broker cluster other than the checkpoint's: publish from its start."""


class Relay:
    """Reads events after its stored checkpoint, publishes them, then moves the checkpoint.

    A crash between publishing and saving the checkpoint republishes; consumers drop duplicates
    by event id. While the broker is down the relay backs off and retries the same batch; the
    service's writes are unaffected, since they only touch the database.
    """

    def __init__(self, store: EventStore, settings: Settings, name: str = "kafka") -> None:
        self.store = store
        self.settings = settings
        self.name = name
        self.source = f"/services/{settings.service_name}"
        self.producer = LazyProducer(settings)
        self.published_position = 0
        self.healthy = True  # false while the last publish attempt failed
        self._cluster: str | None = None  # the broker cluster's id, as last seen
        self._delivery_timeout_s = 3 * settings.kafka_request_timeout_ms / 1000

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                moved = await retry(self._publish_or_drop, what=f"relay {self.name}", stop=stop)
                if not moved:
                    await self._wait(stop)
        except Stopped:
            pass
        finally:
            await self.producer.drop()

    async def _publish_or_drop(self) -> int:
        try:
            return await self.publish_pending()
        except Exception:  # the broker or the database failed: retry the same batch
            self.healthy = False
            raise

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
        async with self.producer.using() as producer:
            if self._cluster is None:
                self._cluster, _ = await broker_view(producer.client, [])
            name = self.checkpoint_name
            checkpoint = await self.store.checkpoint(name)
            batch = await self.store.read_all(after=checkpoint,
                                              limit=self.settings.relay_batch_size)
            if not batch:
                return 0
            # send() queues in order; the client keeps one request in flight per broker, so the
            # records of one partition land in the order queued. The wait is bounded: a
            # producer connected before a broker restart can retry a batch forever without
            # failing it (seen with aiokafka 0.14), and a fresh producer recovers.
            records = [self._record(event) for event in batch]
            with publishing(batch, records, self.settings.service_name):  # traceparent headers
                futures = [await producer.send(**record) for record in records]
                await asyncio.wait_for(asyncio.gather(*futures), self._delivery_timeout_s)
            # The checkpoint moves only if the broker that acknowledged the batch is the one
            # the checkpoint is for, and has every topic of the batch: the embedded broker
            # acknowledges records for a topic it does not have (one a restart made it forget,
            # to a producer connected before, D36). Else the batch is sent again.
            cluster, present = await broker_view(producer.client, {r["topic"] for r in records})
            if cluster != self._cluster:
                self._cluster = cluster
                raise BrokerChanged(f"the broker is now cluster {cluster}: publishing from the "
                                    "start")
            missing = {r["topic"] for r in records} - present
            if missing:
                await ensure_topics(self.settings, sorted(missing))
                raise TopicsForgotten(f"the broker had no {', '.join(sorted(missing))}")
        async with self.store.transaction() as tx:
            await tx.save_checkpoint(name, batch[-1].position)
        self.published_position = batch[-1].position
        self.healthy = True
        return len(batch)

    @property
    def checkpoint_name(self) -> str:
        """This relay's checkpoint on the broker cluster it publishes to."""
        return f"{self.name}@{self._cluster}" if self._cluster else self.name

    def _record(self, event: RecordedEvent) -> dict[str, Any]:
        payload = event.payload()
        cloud = event.to_cloudevent(self.source, payload)
        return {
            "topic": payload.topic_of(),
            "value": cloud.to_bytes(),
            "key": cloud.subject.encode(),
            "headers": [("content-type", b"application/cloudevents+json"),
                        ("ce_type", event.type.encode())],
        }
