"""Anchors on the real broker: a ledger rewritten with every hash recomputed still fails
verification, and a broken chain is never vouched for (D27)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from fastapi import FastAPI

from services.audit.anchors import Anchorer, check_anchors, read_anchors
from services.audit.app import create_audit_app
from shared.auth import issue_dev_token
from shared.events import AUDIT_ANCHORS, AccessDenied
from shared.kafka import ensure_topics
from shared.migrate import upgrade
from shared.settings import Settings
from shared.store import EventStore, NewEvent, utcnow
from tests.conftest import REAL
from tests.support import eventually, rewrite_history, tamper


def _entry() -> NewEvent:
    return NewEvent.of(AccessDenied(access_id=str(uuid.uuid4()), service="test", method="POST",
                                    path="/v1/patients/PT-1/infusions", status=403,
                                    code="forbidden", patient_id="PT-1", denied_at=utcnow()))


@pytest.fixture
async def ledger(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    await upgrade(settings.database_url)
    app = create_audit_app(settings.model_copy(update={
        "consumers_enabled": False, "audit_anchor_interval_s": 0.1}))
    token = issue_dev_token(settings.jwt_secret, "monitor", None, "mona")
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a",
                                     headers={"Authorization": f"Bearer {token}"}) as client:
            yield app, client


async def _append(store: EventStore, n: int) -> int:
    for _ in range(n):
        await store.append(f"access-{uuid.uuid4()}", [_entry()], 0)
    return await store.head()


async def _trial_verify(database_url: str, bootstrap: str, *more: str) -> tuple[int, str]:
    """The operators' `trial verify --anchors`, run as they would run it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tooling.cli", "verify", database_url, "--anchors", bootstrap,
        *more, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip().splitlines()[-1]


async def _anchored(anchorer: Anchorer, position: int) -> None:
    await eventually(lambda: anchorer.anchored_position >= position, 60,
                     f"an anchor at position {position}")


async def test_a_rewrite_with_every_hash_recomputed_is_caught_by_the_anchors(
        ledger: tuple[FastAPI, httpx.AsyncClient], settings: Settings) -> None:
    app, client = ledger
    store: EventStore = app.state.runtime.store
    anchorer: Anchorer = app.state.anchorer
    # (the ledger's own ProtocolVersionActivated is at position 1, written at start-up)
    first_batch = await _append(store, 3)
    await _anchored(anchorer, first_batch)
    head = await _append(store, 3)
    await _anchored(anchorer, head)

    clean: dict[str, Any] = (await client.get("/v1/audit/verify")).json()
    assert clean["ok"] is True and clean["first_anchor_mismatch"] is None
    assert clean["anchors_checked"] >= 2 and clean["head_position"] == head
    assert clean["anchored_through"] == head
    scraped = (await client.get("/metrics")).text
    assert f"trial_audit_anchored_position {float(head)}" in scraped
    first = (await store.verify()).first_hash
    assert first is not None
    published = await read_anchors(settings, first)
    assert {a.position for a in published} >= {first_batch, head}
    assert {a.hash for a in published if a.position == head} == {clean["head_hash"]}
    code, line = await _trial_verify(settings.database_url, settings.kafka_bootstrap_servers)
    assert code == 0 and "first_anchor_mismatch=None" in line, line

    # Somebody with the database's keys changes entry 2 and recomputes the chain after it: the
    # first anchor at or after it no longer matches.
    witness = min(a.position for a in published if a.position >= 2)
    victim = (await store.read_all(after=1, limit=1))[0]
    await rewrite_history(store, 2, {**victim.data, "code": "ok"})
    assert (await store.verify()).ok  # the chain alone is fooled...

    caught = (await client.get("/v1/audit/verify")).json()
    assert caught["ok"] is False  # ...the anchors are not
    assert caught["first_broken_position"] is None
    assert caught["first_anchor_mismatch"] == witness  # the first anchor at or after it
    code, line = await _trial_verify(settings.database_url, settings.kafka_bootstrap_servers)
    assert code == 1 and "ok=True" in line and f"first_anchor_mismatch={witness}" in line, line


async def test_a_rewrite_from_position_1_fails_against_the_pinned_ledger_name(
        ledger: tuple[FastAPI, httpx.AsyncClient], settings: Settings) -> None:
    """D95. The anchors name their ledger by its hash at position 1; whoever rewrites it from
    there renames the ledger, so the anchors published under the old name no longer apply to
    it. Pinned outside the database (TRIAL_AUDIT_LEDGER_ID), the old name still holds them."""
    app, client = ledger
    rt = app.state.runtime
    store: EventStore = rt.store
    head = await _append(store, 3)
    await _anchored(app.state.anchorer, head)
    first = (await store.verify()).first_hash
    assert first is not None
    unpinned = rt.settings
    pinned = unpinned.model_copy(update={"audit_ledger_id": first})
    rt.settings = pinned
    clean = (await client.get("/v1/audit/verify")).json()
    assert (clean["ok"], clean["ledger"], clean["pinned_ledger"],
            clean["pinned_ledger_mismatch"]) == (True, first, first, False)
    assert clean["anchors_checked"] >= 1 and clean["anchored_through"] == head

    victim = (await store.read_all(limit=1))[0]
    assert victim.position == 1
    await rewrite_history(store, 1, {**victim.data, "forged": True})
    renamed = (await store.verify()).first_hash
    assert (await store.verify()).ok and renamed != first  # the chain alone is fooled

    rt.settings = unpinned  # unpinned, the renamed ledger has no anchors to fail against
    fooled = (await client.get("/v1/audit/verify")).json()
    assert (fooled["ok"], fooled["anchors_checked"], fooled["ledger"]) == (True, 0, renamed)
    rt.settings = pinned
    caught = (await client.get("/v1/audit/verify")).json()
    assert (caught["ok"], caught["pinned_ledger_mismatch"], caught["ledger"]) == (
        False, True, renamed)
    assert caught["anchors_checked"] >= 1 and caught["first_anchor_mismatch"] is not None
    code, line = await _trial_verify(settings.database_url, settings.kafka_bootstrap_servers,
                                     "--ledger-id", first)
    assert code == 1 and "pinned_ledger_mismatch=True" in line, line
    code, line = await _trial_verify(settings.database_url, settings.kafka_bootstrap_servers)
    assert code == 0 and "anchors_checked=0" in line, line

    anchorer = Anchorer(store, pinned)  # a restarted ledger never anchors its new name
    try:
        assert await anchorer.anchor_once() is None and anchorer.broken_at == 1
    finally:
        await anchorer.close()


async def test_the_anchors_topic_is_one_partition_kept_forever(settings: Settings) -> None:
    await ensure_topics(settings, [AUDIT_ANCHORS])
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        [topic] = await admin.describe_topics([AUDIT_ANCHORS])
        assert len(topic["partitions"]) == 1  # anchors in the order they were made
        if REAL:  # the embedded broker keeps everything in memory, with no retention to describe
            [response] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, AUDIT_ANCHORS)])
            configs = {entry[0]: entry[1] for resource in response.resources
                       for entry in resource[4]}
            assert configs["retention.ms"] == "-1"
    finally:
        await admin.close()


async def test_a_broken_chain_is_never_anchored(settings: Settings) -> None:
    await upgrade(settings.database_url)
    store = EventStore(settings.database_url)
    anchorer = Anchorer(store, settings)  # driven by hand, one round at a time
    try:
        await _append(store, 2)
        first = await anchorer.anchor_once()
        assert first is not None and (first.position, anchorer.anchored_position) == (2, 2)
        assert await anchorer.anchor_once() is None  # nothing new: nothing published

        await _append(store, 2)
        await tamper(store, "UPDATE events SET type = 'Nothing' WHERE position = 3")
        assert await anchorer.anchor_once() is None
        assert (anchorer.broken_at, anchorer.anchored_position) == (3, 2)
        await _append(store, 1)
        assert await anchorer.anchor_once() is None  # nor anything built on the break

        assert first.ledger == (await store.verify()).first_hash
        published = await read_anchors(settings, first.ledger)
        assert [(a.position, a.hash) for a in published] == [(2, first.hash)]
        found = await check_anchors(store, published)
        assert (found.checked, found.first_mismatch) == (1, None)  # 1-2 are as anchored
        assert (await store.verify()).first_broken_position == 3
    finally:
        await anchorer.close()
        await store.close()
