"""Helpers the integration and e2e tests share: waiting for conditions, reading topics."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.db import is_sqlite
from shared.events import canonical_json
from shared.kafka import client_options, drain, known_partitions
from shared.schema import append_only_ddl, events
from shared.settings import Settings
from shared.store import GENESIS_HASH, EventStore, event_hash


async def eventually(check: Callable[[], Any], timeout: float = 60.0,
                     what: str = "condition") -> Any:
    """Poll `check` (sync or async) until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def read_topic(bootstrap: str, topic: str,
                     until: Callable[[list[ConsumerRecord]], bool],
                     timeout: float = 60.0) -> list[ConsumerRecord]:
    """Read `topic` from the beginning, without a group, until `until(records)` holds."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                metadata_max_age_ms=1000, auto_offset_reset="earliest")
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        deadline = time.monotonic() + timeout

        async def appeared() -> list[TopicPartition]:
            return await known_partitions(consumer, topic)

        tps = await eventually(appeared, max(0.0, deadline - time.monotonic()),
                               f"topic {topic} to appear")
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while not until(records):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out reading {topic}: {len(records)} records")
            batch = await consumer.getmany(*tps, timeout_ms=200)
            for part in batch.values():
                records.extend(part)
    finally:
        await consumer.stop()
    return records


@asynccontextmanager
async def triggers_off(store: EventStore) -> AsyncIterator[AsyncConnection]:
    """A transaction in which the events table takes updates, as an attacker with DDL rights has."""
    async with store.engine.begin() as conn:
        if is_sqlite(store.url):
            await conn.execute(sa.text("DROP TRIGGER events_no_update"))
            yield conn
            await conn.execute(sa.text(append_only_ddl("sqlite", "events")[0]))
        else:
            await conn.execute(sa.text("ALTER TABLE events DISABLE TRIGGER events_append_only"))
            yield conn
            await conn.execute(sa.text("ALTER TABLE events ENABLE TRIGGER events_append_only"))


async def tamper(store: EventStore, statement: str) -> None:
    """Change a row behind the triggers' back, as an attacker with DDL rights could."""
    async with triggers_off(store) as conn:
        await conn.execute(sa.text(statement))


async def rewrite_history(store: EventStore, position: int, data: dict[str, Any]) -> None:
    """Give the event at `position` new data and recompute every hash from there on: the chain
    alone then verifies again. Only hashes kept elsewhere (anchors) can show it."""
    async with triggers_off(store) as conn:
        rows = [dict(r._mapping) for r in await conn.execute(
            events.select().where(events.c.position >= position - 1).order_by(events.c.position))]
        prev = rows.pop(0)["hash"] if position > 1 else GENESIS_HASH
        for row in rows:
            if row["position"] == position:
                row["data"] = data
            row["prev_hash"] = prev
            row["hash"] = prev = event_hash(prev, row)
            # As the store writes it: the canonical JSON the hash is over (`verify` reads it).
            await conn.execute(sa.text(
                "UPDATE events SET data = :data, prev_hash = :prev_hash, hash = :hash "
                "WHERE position = :position"), {
                "data": canonical_json(row["data"]), "prev_hash": row["prev_hash"],
                "hash": row["hash"], "position": row["position"]})


async def read_to_end(source: str | Settings, topic: str,
                      timeout: float = 60.0) -> list[ConsumerRecord]:
    """Every record `topic` (its name on the broker) holds now, read from the beginning without
    a group, to each partition's end (`shared.kafka.drain`); none if there is no such topic.
    `source`: a bootstrap address, or the settings of a client (its SASL, its prefix aside)."""
    options = (client_options(source) if isinstance(source, Settings)
               else {"bootstrap_servers": source})
    consumer = AIOKafkaConsumer(**options, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=50)
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        tps = await known_partitions(consumer, topic)
        if tps:
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            async for part in drain(consumer, tps, timeout):
                records.extend(part)
    finally:
        await consumer.stop()
    return records
