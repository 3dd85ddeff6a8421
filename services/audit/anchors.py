"""The ledger's witnesses outside its own database: verified chain heads on the broker (D27).

A hash chain shows a changed row, unless whoever changed it also recomputed every hash after it,
which anybody able to disable the triggers can do. So the ledger regularly publishes the head of
its verified chain to `trial.audit.anchors`, where its database's users cannot reach, and
`GET /v1/audit/verify` checks the ledger against every anchor published for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError

from shared.events import AUDIT_ANCHORS, AuditChainAnchored, CloudEvent
from shared.kafka import LazyProducer, client_options, ensure_topics, known_partitions, physical
from shared.settings import Settings
from shared.store import GENESIS_HASH, EventStore, utcnow

log = logging.getLogger(__name__)


class Anchorer:
    """Publishes the verified chain head whenever it has moved, at most once per interval."""

    def __init__(self, store: EventStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        # The topic is made before the first anchor, so that a broker's auto-creation never
        # gives it its default retention (days) instead of forever.
        self.producer = LazyProducer(
            settings, before_start=lambda: ensure_topics(settings, [physical(settings, AUDIT_ANCHORS)]))
        self.anchored_position, self.anchored_hash = 0, GENESIS_HASH
        self.ledger: str | None = None
        self.broken_at: int | None = None  # a chain that does not verify is never vouched for

    async def anchor_once(self) -> AuditChainAnchored | None:
        """Verify what was added since the last anchor (all of it after a restart) and anchor it.

        Rows already anchored are not walked again: their anchors witness them, and
        `GET /v1/audit/verify` checks those from position 1.
        """
        if await self.store.head() <= self.anchored_position:
            return None
        result = await self.store.verify(after=self.anchored_position,
                                         after_hash=self.anchored_hash)
        if not result.ok:
            if self.broken_at != result.first_broken_position:
                log.error("audit ledger chain broken at position %s: not anchoring",
                          result.first_broken_position)
            self.broken_at = result.first_broken_position
            return None
        self.ledger = self.ledger or await ledger_id(self.store)
        assert self.ledger is not None and result.last_hash is not None
        if ledger_name(self.ledger, self.settings.audit_ledger_id)[1]:
            if self.broken_at != 1:
                log.error("audit ledger %s is not the pinned TRIAL_AUDIT_LEDGER_ID: not "
                          "anchoring", self.ledger)
            self.broken_at = 1  # never vouched for under a name of its own
            return None
        self.broken_at = None
        anchor = AuditChainAnchored(ledger=self.ledger,
                                    position=self.anchored_position + result.events_checked,
                                    hash=result.last_hash, anchored_at=utcnow())
        cloud = CloudEvent(id=str(uuid.uuid4()), source=f"/services/{self.settings.service_name}",
                           type="AuditChainAnchored", subject=anchor.subject(),
                           time=anchor.anchored_at, data=anchor.model_dump(mode="json"),
                           sequence=anchor.position)
        await self.producer.send_and_wait(
            physical(self.settings, AUDIT_ANCHORS), cloud.to_bytes(), anchor.ledger.encode(),
            [("content-type", b"application/cloudevents+json"),
             ("ce_type", b"AuditChainAnchored")])
        self.anchored_position, self.anchored_hash = anchor.position, anchor.hash
        return anchor

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.anchor_once()
            except Exception as exc:  # broker away: the next round tries again
                log.warning("could not anchor the audit chain: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.audit_anchor_interval_s)
        await self.close()

    async def close(self) -> None:
        await self.producer.drop()


async def read_anchors(settings: Settings, ledger: str, timeout: float = 30.0
                       ) -> list[AuditChainAnchored]:
    """Every anchor published for `ledger`, read from the beginning of the topic to its end."""
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False,
                                auto_offset_reset="earliest",
                                fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
                                request_timeout_ms=settings.kafka_request_timeout_ms)
    await consumer.start()
    try:
        partitions = await known_partitions(consumer, physical(settings, AUDIT_ANCHORS))
        if not partitions:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        found: list[AuditChainAnchored] = []

        async def read_to_end() -> None:
            async def behind() -> bool:
                return any([await consumer.position(tp) < ends[tp] for tp in partitions])

            while await behind():
                batches = await consumer.getmany(*partitions, timeout_ms=500)
                for record in (r for batch in batches.values() for r in batch):
                    try:
                        anchor = AuditChainAnchored.model_validate(
                            CloudEvent.from_bytes(record.value or b"").data)
                    except (ValidationError, ValueError):
                        log.warning("skipping an unreadable anchor at offset %s", record.offset)
                        continue
                    if anchor.ledger == ledger:
                        found.append(anchor)

        await asyncio.wait_for(read_to_end(), timeout)
        return found
    finally:
        await consumer.stop()


@dataclass(frozen=True)
class AnchorCheck:
    checked: int
    first_mismatch: int | None  # the lowest anchored position the ledger no longer matches
    through: int | None = None  # the highest anchored position: the chain witnessed up to here


async def check_anchors(store: EventStore, anchors: list[AuditChainAnchored]) -> AnchorCheck:
    """Each anchor's position must still hold its hash; a missing row is a mismatch too."""
    positions = sorted({a.position for a in anchors})
    held = await store.hashes_at(positions)
    mismatches = [a.position for a in anchors if held.get(a.position) != a.hash]
    return AnchorCheck(len(anchors), min(mismatches) if mismatches else None,
                       max(positions) if positions else None)


async def ledger_id(store: EventStore) -> str | None:
    """The hash at position 1: the name this ledger's anchors carry."""
    return (await store.hashes_at([1])).get(1)


def ledger_name(own: str | None, pinned: str | None) -> tuple[str | None, bool]:
    """The name whose anchors the ledger is checked against, and whether the ledger has lost
    it. Pinned outside the database (`TRIAL_AUDIT_LEDGER_ID`, D95), that name, which the ledger
    must still carry: whoever rewrites it from position 1 renames it, and the anchors published
    under its old name would otherwise no longer apply to it. Else the ledger's own."""
    if pinned is None:
        return own, False
    return pinned, own != pinned
