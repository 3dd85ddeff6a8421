"""A key whose process died is settled at once, not after its lease (D57): a retry that reaches
another replica (or the service started again) finds the first process gone, since its instance
lock went with it, and runs the request (it wrote nothing) or answers outcome unknown (it wrote).
While the first process lives, the retry is still told "in progress"."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from shared.app import ServiceSpec, create_app
from shared.auth import issue_dev_token
from shared.deps import CurrentPrincipal, CurrentRuntime
from shared.runtime import Runtime
from shared.settings import Settings
from shared.store import EventStore
from tests.integration.test_idempotency import Thing, _event, _key_row, _things
from tests.support import eventually

LEASE_S = 600.0  # far beyond the test: nothing here may wait for it
hung = asyncio.Event()  # what the first process's requests wait for: never set while it "lives"
resumed = asyncio.Event()  # what a first process that lost its lock but lives waits for
HANGING: set[int] = set()  # the runtimes (by id) whose requests hang: the first replica's


def _router() -> APIRouter:
    router = APIRouter()

    @router.post("/things", status_code=201)
    async def write(thing: Thing, who: CurrentPrincipal, rt: CurrentRuntime) -> dict[str, str]:
        hangs = id(rt) in HANGING  # the retry, on the other replica, runs through
        if hangs and thing.name.startswith("hang-before"):
            await hung.wait()  # the process dies here, having written nothing
        if hangs and thing.name.startswith("hang-lost"):
            await resumed.wait()  # it lost its instance lock, but lives on, and goes on
        await rt.store.append(f"thing-{uuid.uuid4()}", [_event(thing.name)], 0)
        if hangs and thing.name.startswith("hang-after"):
            await hung.wait()  # the process dies here, after its write committed
        return {"name": thing.name}

    return router


@pytest.fixture
async def replicas(settings: Settings) -> AsyncIterator[list[tuple[httpx.AsyncClient, FastAPI]]]:
    """Two replicas of one service on one database, each with its own runtime."""
    quiet = settings.model_copy(update={"consumers_enabled": False, "relay_enabled": False,
                                        "idempotency_lease_s": LEASE_S})
    token = issue_dev_token(settings.jwt_secret, "site_coordinator", "S1", "alice")
    async with AsyncExitStack() as stack:
        found = []
        for _ in range(2):
            app = create_app(ServiceSpec("idem", _router(), publishes=False), quiet)
            await stack.enter_async_context(app.router.lifespan_context(app))
            client = await stack.enter_async_context(httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                base_url="http://idem", headers={"Authorization": f"Bearer {token}"}))
            found.append((client, app))
        HANGING.add(id(found[0][1].state.runtime))
        try:
            yield found
        finally:
            HANGING.clear()


async def _die(first: FastAPI) -> None:
    """What the kernel does when a process is killed: its instance lock goes (its connection
    closes, its file is unlocked). The request it was running never answers."""
    runtime: Runtime = first.state.runtime
    await runtime._instance.release()


def _first_request(first: httpx.AsyncClient, kind: str
                   ) -> tuple[str, str, dict[str, str], asyncio.Task[httpx.Response]]:
    """The first replica's request under a new key, running: its key, thing's name, body."""
    key, name = f"k-{uuid.uuid4()}", f"{kind}-{uuid.uuid4().hex[:6]}"
    body = {"name": name}
    return key, name, body, asyncio.create_task(first.post(
        "/things", json=body, headers={"Idempotency-Key": key}))


async def _claimed(store: EventStore, key: str) -> bool:
    try:
        await _key_row(store, key)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("moment", ["before", "after"])
async def test_a_retry_on_another_replica_settles_a_key_whose_process_died(
        replicas: list[tuple[httpx.AsyncClient, FastAPI]], moment: str) -> None:
    (first, first_app), (second, second_app) = replicas
    store: EventStore = second_app.state.runtime.store
    key, name, body, running = _first_request(first, f"hang-{moment}")
    try:
        await eventually(lambda: _claimed(store, key), what="the first request's claim")
        if moment == "after":
            await eventually(lambda: _things_written(store, name), what="its write")
        # While the first process lives, a retry is told to wait: it may still answer.
        r = await second.post("/things", json=body, headers={"Idempotency-Key": key})
        assert (r.status_code, r.json()["code"]) == (409, "idempotency_key_in_progress")
        await _die(first_app)
        r = await second.post("/things", json=body, headers={"Idempotency-Key": key})
        if moment == "before":  # it wrote nothing: run it, once
            assert r.status_code == 201, r.text
            assert await _things(store, name) == 1
        else:  # it wrote: never a second time, and the caller is told to look
            assert (r.status_code, r.json()["code"]) == (409, "idempotency_key_outcome_unknown")
            assert await _things(store, name) == 1
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def _things_written(store: EventStore, name: str) -> bool:
    return await _things(store, name) == 1


async def test_a_process_that_lost_its_lock_but_lives_cannot_write_under_a_key_taken_over(
        replicas: list[tuple[httpx.AsyncClient, FastAPI]]) -> None:
    """On PostgreSQL the instance lock is a session's: a database restart or a dropped
    connection ends it while the process runs on. A retry on another replica then takes the
    key for dead and runs the request; the first, going on, must not write as well: its write
    is fenced by its claim, and it answers 409 `idempotency_key_taken_over`."""
    (first, first_app), (second, second_app) = replicas
    store: EventStore = second_app.state.runtime.store
    key, name, body, running = _first_request(first, "hang-lost")
    try:
        await eventually(lambda: _claimed(store, key), what="the first request's claim")
        await _die(first_app)  # its lock is gone; the process and its request are not
        r = await second.post("/things", json=body, headers={"Idempotency-Key": key})
        assert r.status_code == 201, r.text
        resumed.set()
        late = await asyncio.wait_for(running, 60)
        assert (late.status_code, late.json()["code"]) == (409, "idempotency_key_taken_over")
        assert await _things(store, name) == 1  # once, by the retry
        again = await second.post("/things", json=body, headers={"Idempotency-Key": key})
        assert (again.status_code, again.json()) == (201, {"name": name})  # the retry's answer
        assert again.headers["idempotent-replayed"] == "true"
    finally:
        resumed.clear()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
