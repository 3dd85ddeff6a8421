"""An oversized body, through the gateway and straight at a service: 413, and nothing written."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest

from shared.settings import Settings
from shared.store import EventStore
from tests.e2e.conftest import client, screening
from tooling.launcher import System

LIMIT = Settings().max_body_bytes


async def _chunks(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i:i + size]


@pytest.mark.parametrize("service", ["gateway", "randomization"])
@pytest.mark.parametrize("chunked", [False, True])
async def test_an_oversized_screening_is_refused_and_writes_nothing(
        system: System, service: str, chunked: bool) -> None:
    number = f"S1-big-{uuid.uuid4().hex[:8]}"
    raw = json.dumps(screening("S1", number) | {"padding": "x" * LIMIT}).encode()
    async with client(system, service=service) as c:
        content = _chunks(raw) if chunked else raw
        r = await c.post("/v1/screenings", content=content,
                         headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json()["code"] == "payload_too_large"
        assert r.headers["content-type"].startswith("application/problem+json")
        # The service is still there, and takes the same screening at its normal size.
        ok = await c.post("/v1/screenings", json=screening("S1", number))
        assert ok.status_code == 201, ok.text
    store = EventStore(system.database_urls["randomization"])
    try:
        recorded = [e for e in await store.read_all(limit=100_000)
                    if e.data.get("screening_number") == number]
    finally:
        await store.close()
    assert [e.type for e in recorded] == ["PatientScreened"]  # the normal one only
