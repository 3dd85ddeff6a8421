"""The one producer a process holds (`LazyProducer`), on the real broker: a record it sends
arrives, and a send that would wait for ever is given up in bounded time (D72)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from shared.kafka import LazyProducer, ensure_topics
from shared.settings import Settings
from tests.support import read_topic


async def test_a_wedged_send_is_given_up_the_producer_dropped_and_the_next_send_arrives(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DLQ and the audit anchorer send through it: a send that never ended (aiokafka can
    wait for ever on a broker that went away under it) stalled a consumer on a poison record
    for good. No broker wedges on demand, so the client's first send is made to wait for ever."""
    settings = settings.model_copy(update={"kafka_request_timeout_ms": 1000})
    topic = f"test.producer.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic])
    send = AIOKafkaProducer.send_and_wait
    wedged: list[AIOKafkaProducer] = []

    async def wedged_once(self: AIOKafkaProducer, *args: Any, **kwargs: Any) -> Any:
        if not wedged:
            wedged.append(self)
            await asyncio.Event().wait()
        return await send(self, *args, **kwargs)

    monkeypatch.setattr(AIOKafkaProducer, "send_and_wait", wedged_once)
    lazy = LazyProducer(settings)
    try:
        with pytest.raises(TimeoutError):  # bounded: 3 x the request timeout
            # (the outer 30 s only keeps a regression from hanging the suite: it cancels, and
            # a cancelled send leaves its producer in place, which the next line catches)
            await asyncio.wait_for(lazy.send_and_wait(topic, b"first", b"k"), 30)
        assert len(wedged) == 1 and lazy._producer is None  # dropped: the next send reconnects
        await lazy.send_and_wait(topic, b"second", b"k", [("h", b"v")])
        assert lazy._producer is not None and lazy._producer is not wedged[0]
    finally:
        await lazy.drop()
    records = await read_topic(settings.kafka_bootstrap_servers, topic,
                               until=lambda rs: any(r.value == b"second" for r in rs))
    assert [(r.value, r.key, list(r.headers)) for r in records] == [(b"second", b"k",
                                                                     [("h", b"v")])]
