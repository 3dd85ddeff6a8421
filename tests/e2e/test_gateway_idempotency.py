"""Idempotency-Key through the gateway and straight at a service: one write per key and body."""

from __future__ import annotations

import asyncio
import uuid

import httpx

from shared.store import EventStore
from tests.e2e.conftest import screening, token
from tooling.launcher import System


def _as(system: System, sub: str, service: str = "gateway") -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=system.url(service), timeout=60, headers={
        "Authorization": f"Bearer {token('site_coordinator', 'S1', sub)}"})


async def _screenings_numbered(system: System, number: str) -> int:
    store = EventStore(system.database_urls["randomization"])
    try:
        events, after = [], 0
        while batch := await store.read_all(after=after):
            events += [e for e in batch if e.data.get("screening_number") == number]
            after = batch[-1].position
        return len(events)
    finally:
        await store.close()


async def test_a_replayed_post_gets_the_first_answer_and_writes_one_event(system: System) -> None:
    sub, key = f"idem-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    body = screening("S1")
    async with _as(system, sub) as site:
        first = await site.post("/v1/screenings", json=body, headers={"Idempotency-Key": key})
        assert first.status_code == 201, first.text
        again = await site.post("/v1/screenings", json=body,
                                headers={"Idempotency-Key": key, "X-Request-ID": "retry-1"})
        assert again.status_code == 201 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        assert again.headers["x-request-id"] == "retry-1"
        assert "idempotent-replayed" not in first.headers
        assert await _screenings_numbered(system, str(body["screening_number"])) == 1

        other = {**body, "weight_kg": 71.0}
        r = await site.post("/v1/screenings", json=other, headers={"Idempotency-Key": key})
        assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused"
        assert r.headers["content-type"] == "application/problem+json"
        r = await site.post("/v1/patients", json={"screening_id": first.json()["screening_id"]},
                            headers={"Idempotency-Key": key})
        assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused"
        assert await _screenings_numbered(system, str(body["screening_number"])) == 1

        # Without a key, the same body is a new screening: keys are what make retries safe.
        r = await site.post("/v1/screenings", json=body)
        assert r.status_code == 201 and r.json()["screening_id"] != first.json()["screening_id"]
        assert await _screenings_numbered(system, str(body["screening_number"])) == 2


async def test_keys_belong_to_their_principal(system: System) -> None:
    key, body = str(uuid.uuid4()), screening("S1")
    async with _as(system, f"a-{uuid.uuid4().hex[:8]}") as a, \
            _as(system, f"b-{uuid.uuid4().hex[:8]}") as b:
        ra = await a.post("/v1/screenings", json=body, headers={"Idempotency-Key": key})
        rb = await b.post("/v1/screenings", json=body, headers={"Idempotency-Key": key})
    assert ra.status_code == rb.status_code == 201
    assert ra.json()["screening_id"] != rb.json()["screening_id"]
    assert await _screenings_numbered(system, str(body["screening_number"])) == 2


async def test_concurrent_duplicates_never_both_execute(system: System) -> None:
    key, body = str(uuid.uuid4()), screening("S1")
    async with _as(system, f"race-{uuid.uuid4().hex[:8]}") as site:
        answers = await asyncio.gather(*(
            site.post("/v1/screenings", json=body, headers={"Idempotency-Key": key})
            for _ in range(8)))
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {201, 409} and 201 in statuses, statuses
    assert all(r.json()["code"] == "idempotency_key_in_progress" and r.headers["retry-after"]
               for r in answers if r.status_code == 409)
    assert len({r.json()["screening_id"] for r in answers if r.status_code == 201}) == 1
    assert await _screenings_numbered(system, str(body["screening_number"])) == 1


async def test_the_kernel_keeps_keys_at_the_service_too(system: System) -> None:
    key, body = str(uuid.uuid4()), screening("S1")
    async with _as(system, f"direct-{uuid.uuid4().hex[:8]}", "randomization") as direct:
        first = await direct.post("/v1/screenings", json=body, headers={"Idempotency-Key": key})
        again = await direct.post("/v1/screenings", json=body, headers={"Idempotency-Key": key})
        bad = await direct.post("/v1/screenings", json=body,
                                headers={"Idempotency-Key": "has spaces in it"})
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_idempotency_key"
    assert await _screenings_numbered(system, str(body["screening_number"])) == 1


async def test_a_refused_write_is_answered_again_without_a_second_access_record(
        system: System) -> None:
    key, sub = str(uuid.uuid4()), f"refused-{uuid.uuid4().hex[:8]}"
    async with _as(system, sub) as site:
        answers = [await site.post("/v1/patients", json={"screening_id": "no-such-screening"},
                                   headers={"Idempotency-Key": key}) for _ in range(2)]
    assert [r.status_code for r in answers] == [404, 404]
    assert answers[1].headers["idempotent-replayed"] == "true"
    assert answers[0].json() == answers[1].json()
    store = EventStore(system.database_urls["randomization"])
    try:
        denied = [e for e in await store.read_all(limit=1_000_000)
                  if e.type == "AccessDenied" and e.metadata.get("actor") == sub]
    finally:
        await store.close()
    assert len(denied) == 1 and denied[0].data["code"] == "screening_not_found"
