"""Protocol versions are events (issue 10, defect 18): every service records, in its own store,
the version it starts applying (the first included), once, however many replicas start."""

from __future__ import annotations

import asyncio

import httpx

from services.randomization.app import spec as randomization_spec
from shared.app import Runtime, create_app
from shared.auth import issue_dev_token
from shared.events import ProtocolVersionActivated
from shared.protocol import default_protocol
from shared.runtime import activate_protocol
from shared.settings import Settings
from shared.store import EventStore
from tests.e2e.conftest import screening


async def activations(store: EventStore, service: str) -> list[ProtocolVersionActivated]:
    found = [e.payload() for e in await store.read_stream(f"protocol-{service}")]
    assert all(isinstance(e, ProtocolVersionActivated) for e in found)
    return found  # type: ignore[return-value]


async def test_a_service_records_each_protocol_version_it_starts_applying_once(
        store: EventStore, database_url: str) -> None:
    v1 = default_protocol()
    replicas = [EventStore(database_url) for _ in range(3)]
    try:
        await asyncio.gather(*(activate_protocol(r, "dosing", v1) for r in replicas))
    finally:
        for r in replicas:
            await r.close()
    [first] = await activations(store, "dosing")
    assert (first.version, first.content_hash, first.activated_by) == (
        v1.version, v1.content_hash(), "service:dosing")
    assert await activate_protocol(store, "dosing", v1) is None  # a restart: nothing new
    amended = v1.model_copy(update={"enrollment_cap": 60})  # same version name, other content
    assert amended.content_hash() != v1.content_hash()
    assert await activate_protocol(store, "dosing", amended) is not None
    assert [a.content_hash for a in await activations(store, "dosing")] == [
        v1.content_hash(), amended.content_hash()]


async def test_a_started_service_has_recorded_its_version_and_refusals_name_it(
        settings: Settings) -> None:
    app = create_app(randomization_spec, settings.model_copy(update={"consumers_enabled": False}))
    async with app.router.lifespan_context(app):
        runtime: Runtime = app.state.runtime
        [activated] = await activations(runtime.store, "randomization")
        assert activated.version == runtime.protocol.version
        token = issue_dev_token(settings.jwt_secret, "site_coordinator", "S9")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r",
                                     headers={"Authorization": f"Bearer {token}"}) as api:
            r = await api.post("/v1/screenings", json=screening(site="S9"))
    assert (r.status_code, r.json()["code"]) == (422, "unknown_site")
    assert r.json()["protocol_version"] == runtime.protocol.version
