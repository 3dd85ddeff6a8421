"""The reads made through the audit service, on the broker too (D93).

Every entry of the ledger but one kind is a record of a ledger topic, so a ledger rebuilt from
the topics (`trial rebuild-projection audit`) holds it again. The exception was a monitor's or
the DSMB's read of a patient through the audit service's own routes: it is filed straight into
the ledger before the answer leaves (D50), and no topic carried it, so a rebuilt ledger lost the
record of who saw the patient. `ViewPublisher` publishes those entries to trial.access, each as
the envelope it was filed from (`ledger_cloudevent`), in ledger order, at least once: the ledger
holds each event id once, so its own consumer skips them when it reads them back (D89), and a
rebuild files each once. Its checkpoint is the broker cluster's, as a relay's (issue 15): a new
broker gets them all again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from services.audit.commands import ledger_cloudevent
from services.audit.domain import AUDIT_SOURCE
from shared.events import ACCESS, PatientDataViewed
from shared.kafka import LazyProducer, broker_view, ensure_topics, physical
from shared.settings import Settings
from shared.store import EventFilter, EventStore

log = logging.getLogger(__name__)

# The ledger's own entries that no topic carries: the reads filed by `record_view`.
OWN_VIEWS = EventFilter(types=(PatientDataViewed.event_type(),),
                        metadata={"source": AUDIT_SOURCE})


class ViewPublisher:
    """Publishes the reads filed through the audit service to trial.access, every interval."""

    def __init__(self, store: EventStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.topic = physical(settings, ACCESS)
        # Made before the first record, so that auto-creation never gives it a default retention.
        self.producer = LazyProducer(settings,
                                     before_start=lambda: ensure_topics(settings, [self.topic]))
        self.published = 0  # reads published by this process
        self.through = 0  # the ledger's position through which they are on the broker

    async def publish_once(self) -> int:
        """Publish the reads filed since the checkpoint, then move it to the head read; how many."""
        async with self.producer.using() as producer:
            cluster, _ = await broker_view(producer.client, [])
            checkpoint = f"audit-views@{cluster}" if cluster else "audit-views"  # as a relay's
            after, head = await self.store.checkpoint(checkpoint), await self.store.head()
            if head <= after:
                self.through = after
                return 0
            sent = []
            async for page in self.store.scan(after=after, where=OWN_VIEWS):
                # What committed after the head was read goes next time.
                for row in (row for row in page if row.position <= head):
                    cloud = ledger_cloudevent(row.event_id, row.type, row.schema_version,
                                              json.loads(row.data), json.loads(row.metadata))
                    sent.append(await producer.send(
                        self.topic, cloud.to_bytes(), key=cloud.subject.encode(),
                        headers=[("content-type", b"application/cloudevents+json"),
                                 ("ce_type", cloud.type.encode())]))
            await asyncio.wait_for(asyncio.gather(*sent),
                                   3 * self.settings.kafka_request_timeout_ms / 1000)
        await self.store.save_checkpoint(checkpoint, head)
        self.published, self.through = self.published + len(sent), head
        return len(sent)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.publish_once()
            except Exception as exc:  # broker or database away: the next round tries again
                log.warning("could not publish the audit service's reads: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.audit_views_interval_s)
        await self.producer.drop()
