"""PostgreSQL restarting under a service (issue 15): while it is down every request is answered
503 `database_unavailable` with Retry-After, never a 500, and nothing is written; a retry with the
same Idempotency-Key succeeds once it is back, once, even for a request the outage cut off midway
(its key is released when the database answers again, not held until the lease runs out).

On a PostgreSQL cluster of the test's own (the session's is shared by every other test), so on
`make test-real` only: SQLite has no server to restart."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import APIRouter

from deploy import infra
from shared.app import ServiceSpec, create_app
from shared.auth import issue_dev_token
from shared.deps import CurrentPrincipal, CurrentRuntime
from shared.migrate import upgrade
from shared.settings import Settings
from shared.store import EventStore
from tests.conftest import REAL
from tests.integration.test_idempotency import Thing, _event, _things
from tests.support import eventually

LEASE_S = 600.0  # far longer than the test: a key must be released, not left to expire


class Cluster:
    """A PostgreSQL cluster of the test's own, stopped and started by it."""

    def __init__(self, state_dir: Path) -> None:
        self.port, self.state_dir = infra.free_port(), state_dir

    def start(self) -> str:
        return infra.start_postgres(self.port, state_dir=self.state_dir)

    def stop(self) -> None:
        infra.stop_postgres(self.port, state_dir=self.state_dir)


def _router(cluster: Cluster) -> APIRouter:
    router = APIRouter()

    @router.post("/things", status_code=201)
    async def write(thing: Thing, who: CurrentPrincipal, rt: CurrentRuntime) -> dict[str, str]:
        await rt.store.append(f"thing-{uuid.uuid4()}", [_event(thing.name)], 0)
        return {"name": thing.name}

    @router.post("/things/outage-midway", status_code=201)
    async def outage_midway(thing: Thing, who: CurrentPrincipal,
                            rt: CurrentRuntime) -> dict[str, str]:
        """The database goes down after the key was claimed, before the write (once)."""
        if thing.name == "cut-off" and not getattr(rt, "cut_off", False):
            rt.cut_off = True  # type: ignore[attr-defined]
            await asyncio.to_thread(cluster.stop)
        await rt.store.append(f"thing-{uuid.uuid4()}", [_event(thing.name)], 0)
        return {"name": thing.name}

    return router


@pytest.fixture
async def service(tmp_path: Path, settings: Settings
                  ) -> AsyncIterator[tuple[httpx.AsyncClient, EventStore, Cluster]]:
    cluster = Cluster(tmp_path / "pg")
    dsn = cluster.start()
    try:
        name = f"restart_{uuid.uuid4().hex[:8]}"
        infra.create_database(dsn, name)
        url = f"postgresql+asyncpg://{urlsplit(dsn).netloc}/{name}"
        await upgrade(url)
        app = create_app(ServiceSpec("idem", _router(cluster), publishes=False),
                         settings.model_copy(update={"database_url": url,
                                                     "consumers_enabled": False,
                                                     "idempotency_lease_s": LEASE_S}))
        token = issue_dev_token(settings.jwt_secret, "site_coordinator", "S1", "alice")
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://idem",
                                         headers={"Authorization": f"Bearer {token}"}) as client:
                yield client, app.state.runtime.store, cluster
    finally:
        cluster.stop()


async def _until_answered(client: httpx.AsyncClient, path: str, body: dict[str, str],
                          key: str, timeout: float = 60.0) -> list[httpx.Response]:
    """Send as a site system does: again with the same key while the answer says Retry-After."""
    answers: list[httpx.Response] = []

    async def answered() -> bool:
        r = await client.post(path, json=body, headers={"Idempotency-Key": key})
        answers.append(r)
        return "retry-after" not in r.headers

    await eventually(answered, timeout=timeout, what=f"an answer to {path}")
    return answers


if REAL:
    async def test_while_the_database_is_down_requests_get_503_and_retries_succeed_after(
            service: tuple[httpx.AsyncClient, EventStore, Cluster]) -> None:
        client, store, cluster = service
        r = await client.post("/things", json={"name": "before"},
                              headers={"Idempotency-Key": "k-before"})
        assert r.status_code == 201, r.text
        await asyncio.to_thread(cluster.stop)

        key = f"k-{uuid.uuid4()}"
        r = await client.post("/things", json={"name": "during"}, headers={"Idempotency-Key": key})
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "database_unavailable"
        assert int(r.headers["retry-after"]) >= 1
        r = await client.post("/things", json={"name": "no-key"})  # without a key, the same
        assert (r.status_code, r.json()["code"]) == (503, "database_unavailable")
        r = await client.get("/readyz")
        assert r.status_code == 503

        await asyncio.to_thread(cluster.start)
        answers = await _until_answered(client, "/things", {"name": "during"}, key)
        assert answers[-1].status_code == 201, answers[-1].text
        assert all(a.status_code in (201, 409, 503) for a in answers), [a.status_code for a in answers]
        assert await _things(store, "during") == 1
        assert await _things(store, "no-key") == 0  # its 503 wrote nothing
        replay = await client.post("/things", json={"name": "during"},
                                   headers={"Idempotency-Key": key})
        assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"

    async def test_a_request_the_outage_cut_off_midway_runs_once_after(
            service: tuple[httpx.AsyncClient, EventStore, Cluster]) -> None:
        client, store, cluster = service
        key = f"k-{uuid.uuid4()}"
        r = await client.post("/things/outage-midway", json={"name": "cut-off"},
                              headers={"Idempotency-Key": key})
        assert (r.status_code, r.json()["code"]) == (503, "database_unavailable"), r.text
        await asyncio.to_thread(cluster.start)
        # Its key was claimed before the outage and could not be given up then: it is released
        # once the database answers, so the retry runs within seconds, not after the lease.
        answers = await _until_answered(client, "/things/outage-midway", {"name": "cut-off"},
                                        key, timeout=30)
        assert answers[-1].status_code == 201, answers[-1].text
        assert await _things(store, "cut-off") == 1
