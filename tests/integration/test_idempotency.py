"""Idempotency-Key across failures, on the real database, through the kernel's own app (D25).

The key is marked written in the transaction that commits the request's events, so no failure
after that point can let a retry write a second time; a first attempt that died before writing is
run again once its lease has passed.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
import sqlalchemy as sa
from fastapi import APIRouter
from pydantic import BaseModel
from starlette.types import Message

from shared.app import ServiceSpec, create_app
from shared.auth import issue_dev_token
from shared.deps import CurrentPrincipal, CurrentRuntime
from shared.events import AccessDenied
from shared.idempotency import idempotency_keys, request_hash
from shared.settings import Settings
from shared.store import EventStore, NewEvent, utcnow
from shared.web import Problem

LEASE_S = 60.0


class Thing(BaseModel):
    name: str


def _event(name: str) -> NewEvent:
    # Any catalogue event will do; this one needs nothing from another service.
    return NewEvent.of(AccessDenied(access_id=str(uuid.uuid4()), service="test", method="POST",
                                    path=f"/things/{name}", status=201, code="ok",
                                    denied_at=utcnow()))


def _router() -> APIRouter:
    router = APIRouter()

    @router.post("/things", status_code=201)
    async def write(thing: Thing, who: CurrentPrincipal, rt: CurrentRuntime) -> dict[str, str]:
        await rt.store.append(f"thing-{uuid.uuid4()}", [_event(thing.name)], 0)
        return {"name": thing.name}

    @router.post("/things/busy")
    async def busy(thing: Thing, who: CurrentPrincipal) -> None:
        problem = Problem(503, "not_caught_up", "Not yet; retry shortly")
        problem.headers = {"Retry-After": "1"}
        raise problem

    @router.post("/things/fail-after-write")
    async def fail_after_write(thing: Thing, who: CurrentPrincipal,
                               rt: CurrentRuntime) -> dict[str, str]:
        await rt.store.append(f"thing-{uuid.uuid4()}", [_event(thing.name)], 0)
        raise RuntimeError("the answer is lost after the write committed")

    @router.post("/things/fail-before-write")
    async def fail_before_write(thing: Thing, who: CurrentPrincipal) -> dict[str, str]:
        raise RuntimeError("nothing was written")

    @router.post("/things/rolled-back")
    async def rolled_back(thing: Thing, who: CurrentPrincipal, rt: CurrentRuntime) -> None:
        async with rt.store.transaction() as tx:
            await tx.append(f"thing-{uuid.uuid4()}", [_event(thing.name)], 0)
            raise RuntimeError("the write rolls back, and the written mark with it")

    return router


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, EventStore]]:
    app = create_app(ServiceSpec("idem", _router(), publishes=False), settings.model_copy(update={
        "consumers_enabled": False, "idempotency_lease_s": LEASE_S, "max_body_bytes": 1024}))
    token = issue_dev_token(settings.jwt_secret, "site_coordinator", "S1", "alice")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://idem",
                                     headers={"Authorization": f"Bearer {token}"}) as client:
            yield client, app.state.runtime.store


async def _things(store: EventStore, name: str) -> int:
    return sum(1 for e in await store.read_all(limit=10_000) if e.data.get("path") == f"/things/{name}")


async def _key_row(store: EventStore, key: str) -> sa.Row[tuple[object, ...]]:
    async with store.read_engine.connect() as conn:
        row = (await conn.execute(sa.select(idempotency_keys).where(
            idempotency_keys.c.key == key))).one()
    return row


async def test_the_write_and_the_written_mark_commit_together(
        api: tuple[httpx.AsyncClient, EventStore]) -> None:
    client, store = api
    key = f"k-{uuid.uuid4()}"
    r = await client.post("/things", json={"name": "a"}, headers={"Idempotency-Key": key})
    assert r.status_code == 201
    row = await _key_row(store, key)
    assert row.written_at is not None and row.status == 201
    again = await client.post("/things", json={"name": "a"}, headers={"Idempotency-Key": key})
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert await _things(store, "a") == 1


async def test_a_request_that_wrote_and_then_failed_is_never_run_again(
        api: tuple[httpx.AsyncClient, EventStore]) -> None:
    client, store = api
    key = f"k-{uuid.uuid4()}"
    first = await client.post("/things/fail-after-write", json={"name": "b"},
                              headers={"Idempotency-Key": key})
    assert first.status_code == 500
    row = await _key_row(store, key)
    assert row.written_at is not None and row.status == 409  # kept, not released
    for _ in range(3):
        retry = await client.post("/things/fail-after-write", json={"name": "b"},
                                  headers={"Idempotency-Key": key})
        assert retry.status_code == 409 and retry.headers["idempotent-replayed"] == "true"
        assert retry.json()["code"] == "idempotency_key_outcome_unknown"
    assert await _things(store, "b") == 1


@pytest.mark.parametrize("path", ["/things/fail-before-write", "/things/rolled-back"])
async def test_a_request_that_failed_without_writing_releases_its_key(
        api: tuple[httpx.AsyncClient, EventStore], path: str) -> None:
    client, store = api
    key = f"k-{uuid.uuid4()}"
    first = await client.post(path, json={"name": "c"}, headers={"Idempotency-Key": key})
    assert first.status_code == 500
    async with store.read_engine.connect() as conn:
        left = (await conn.execute(sa.select(sa.func.count()).select_from(idempotency_keys)
                                   .where(idempotency_keys.c.key == key))).scalar_one()
    assert left == 0  # released: a retry may run it
    assert await _things(store, "c") == 0


async def _crashed_claim(store: EventStore, key: str, body: bytes, age: timedelta,
                         written: bool, path: str = "/things") -> None:
    """What a process that died mid-request leaves behind: a claim with no answer."""
    async with store.engine.begin() as conn:
        await conn.execute(idempotency_keys.insert().values(
            principal="alice", key=key, request_hash=request_hash("POST", path, b"", body),
            created_at=utcnow() - age, written_at=utcnow() - age if written else None))


async def test_a_dead_first_attempt_that_wrote_nothing_is_run_again_after_its_lease(
        api: tuple[httpx.AsyncClient, EventStore]) -> None:
    client, store = api
    body = b'{"name":"d"}'
    fresh, stale = f"k-{uuid.uuid4()}", f"k-{uuid.uuid4()}"
    await _crashed_claim(store, fresh, body, timedelta(seconds=LEASE_S / 2), written=False)
    await _crashed_claim(store, stale, body, timedelta(seconds=LEASE_S * 2), written=False)
    headers = {"Content-Type": "application/json"}

    r = await client.post("/things", content=body, headers={**headers, "Idempotency-Key": fresh})
    assert r.status_code == 409 and r.json()["code"] == "idempotency_key_in_progress"
    assert await _things(store, "d") == 0

    r = await client.post("/things", content=body, headers={**headers, "Idempotency-Key": stale})
    assert r.status_code == 201, r.text
    r = await client.post("/things", content=body, headers={**headers, "Idempotency-Key": stale})
    assert r.status_code == 201 and r.headers["idempotent-replayed"] == "true"
    assert await _things(store, "d") == 1

    # Another body under the stale key is still another request.
    other = f"k-{uuid.uuid4()}"
    await _crashed_claim(store, other, body, timedelta(seconds=LEASE_S * 2), written=False)
    r = await client.post("/things", json={"name": "e"}, headers={"Idempotency-Key": other})
    assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused"


async def test_a_first_attempt_that_wrote_is_never_run_again(
        api: tuple[httpx.AsyncClient, EventStore]) -> None:
    client, store = api
    body = b'{"name":"f"}'
    running, dead = f"k-{uuid.uuid4()}", f"k-{uuid.uuid4()}"
    # Written and not yet answered: still running, as far as anyone can tell, until the lease ends.
    await _crashed_claim(store, running, body, timedelta(seconds=LEASE_S / 2), written=True)
    await _crashed_claim(store, dead, body, timedelta(hours=1), written=True)
    headers = {"Content-Type": "application/json"}
    r = await client.post("/things", content=body, headers={**headers, "Idempotency-Key": running})
    assert r.status_code == 409 and r.json()["code"] == "idempotency_key_in_progress"
    r = await client.post("/things", content=body, headers={**headers, "Idempotency-Key": dead})
    assert r.status_code == 409 and r.json()["code"] == "idempotency_key_outcome_unknown"
    assert await _things(store, "f") == 0  # the test's claims stand for writes made elsewhere


async def test_a_body_cut_off_at_the_size_limit_does_not_use_up_its_key(
        api: tuple[httpx.AsyncClient, EventStore]) -> None:
    client, store = api
    key = f"k-{uuid.uuid4()}"

    async def chunked() -> AsyncIterator[bytes]:
        yield b'{"name": "'
        for _ in range(10):
            yield b"g" * 1000
        yield b'"}'

    r = await client.post("/things", content=chunked(), headers={
        "Content-Type": "application/json", "Idempotency-Key": key})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    r = await client.post("/things", json={"name": "g"}, headers={"Idempotency-Key": key})
    assert r.status_code == 201, r.text
    assert await _things(store, "g") == 1


@pytest.mark.parametrize(("path", "status", "kept"), [
    ("/things/busy", 503, None),  # a 5xx: the key released
    ("/things", 201, 201),        # an answer: the key holds it
])
async def test_the_key_is_settled_before_the_caller_hears_the_answer(
        settings: Settings, path: str, status: int, kept: int | None) -> None:
    """A site retries the moment an answer arrives (a 503 with Retry-After is made for that,
    and a lost 201 is retried at once): by then the key must hold the answer, or be free after
    a 5xx, never be in progress. Found under load (a retry after a 503 got 409
    idempotency_key_in_progress) and on PostgreSQL (a retry right after a 201 got the same)."""
    app = create_app(ServiceSpec("idem", _router(), publishes=False),
                     settings.model_copy(update={"consumers_enabled": False}))
    token = issue_dev_token(settings.jwt_secret, "site_coordinator", "S1", "alice")
    key, body = f"k-{uuid.uuid4()}", b'{"name":"busy"}'
    seen: dict[str, object] = {}
    async with app.router.lifespan_context(app):
        store: EventStore = app.state.runtime.store

        async def receive() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":  # what the caller sees first
                seen["status"] = message["status"]
                async with store.read_engine.connect() as conn:
                    seen["kept"] = [row.status for row in await conn.execute(
                        sa.select(idempotency_keys).where(idempotency_keys.c.key == key))]

        headers = [(b"host", b"idem"), (b"content-type", b"application/json"),
                   (b"authorization", f"Bearer {token}".encode()),
                   (b"idempotency-key", key.encode())]
        await app({"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                   "method": "POST", "scheme": "http", "path": path,
                   "raw_path": path.encode(), "query_string": b"", "root_path": "",
                   "headers": headers, "client": ("127.0.0.1", 1), "server": ("idem", 80)},
                  receive, send)
    assert seen == {"status": status, "kept": [] if kept is None else [kept]}
