"""The gateway on its own, in front of services that are down or too slow: clear 503 and 504
problems, 429 with Retry-After per principal, and its published documents."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from deploy import infra
from shared.settings import SERVICES
from tests.e2e.conftest import SECRET, token
from tooling.launcher import System


@pytest.fixture
async def stalled_port() -> AsyncIterator[int]:
    """A service that accepts connections and never answers."""
    never = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def stall(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await never.wait()

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    never.set()
    for writer in held:
        writer.close()
    server.close()


@pytest.fixture
async def lone_gateway(tmp_path: Path, stalled_port: int) -> AsyncIterator[System]:
    """Only the gateway runs: randomization, dosing and audit are down; safety stalls."""
    ports = {s: infra.free_port() for s in (*SERVICES, "gateway")}
    ports["safety"] = stalled_port
    system = System(bootstrap="127.0.0.1:1", database_urls={}, ports=ports,
                    log_dir=tmp_path / "logs",
                    env={"TRIAL_JWT_SECRET": SECRET, "TRIAL_UPSTREAM_TIMEOUT_S": "1",
                         "TRIAL_RATE_LIMIT_BURST": "5", "TRIAL_RATE_LIMIT_PER_S": "0.2"})
    system.start(("gateway",))
    try:
        await asyncio.to_thread(system.wait_ready)
        yield system
    finally:
        await asyncio.to_thread(system.stop)


def _as(system: System, role: str, sub: str) -> httpx.AsyncClient:
    site = "S1" if role in ("site_coordinator", "investigator", "pharmacist") else None
    return httpx.AsyncClient(base_url=system.url(), timeout=60,
                             headers={"Authorization": f"Bearer {token(role, site, sub)}"})


async def test_a_service_that_is_down_is_a_503_and_a_slow_one_a_504(lone_gateway: System) -> None:
    async with _as(lone_gateway, "monitor", "mon-down") as monitor:
        r = await monitor.get("/v1/patients/PT-1", headers={"X-Request-ID": "down-1"})
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "service_unavailable" and "randomization" in r.json()["title"]
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["x-request-id"] == "down-1"
        assert r.headers["retry-after"] == "1"  # a restart, most likely: try again (issue 15)
        r = await monitor.get("/v1/audit/verify")
        assert (r.status_code, r.json()["code"]) == (503, "service_unavailable")
        r = await monitor.get("/v1/safety/status")
        assert r.status_code == 504, r.text
        assert r.json()["code"] == "upstream_timeout" and "safety" in r.json()["title"]
        # Refusals and unknown routes never need a service.
        r = await monitor.post("/v1/screenings", json={})
        assert (r.status_code, r.json()["code"]) == (403, "forbidden")
        r = await monitor.get("/v1/nothing")
        assert (r.status_code, r.json()["code"]) == (404, "not_found")
        assert (await monitor.get("/readyz")).status_code == 200


async def test_the_rate_limit_is_per_principal_and_says_when_to_retry(lone_gateway: System) -> None:
    async with _as(lone_gateway, "monitor", "busy") as busy, \
            _as(lone_gateway, "monitor", "patient") as patient:
        statuses = [(await busy.get("/v1/patients/PT-1")).status_code for _ in range(5)]
        assert statuses == [503] * 5  # within the burst: forwarded (to a service that is down)
        r = await busy.get("/v1/patients/PT-1")
        assert r.status_code == 429, r.text
        assert r.json()["code"] == "rate_limited"
        assert r.headers["content-type"] == "application/problem+json"
        assert 1 <= int(r.headers["retry-after"]) <= 5
        # Another caller has its own bucket.
        assert (await patient.get("/v1/patients/PT-1")).status_code == 503
    async with httpx.AsyncClient(base_url=lone_gateway.url(), timeout=60) as anonymous:
        assert (await anonymous.get("/v1/patients/PT-1")).status_code == 401


async def test_tokens_are_checked_before_anything_else(lone_gateway: System) -> None:
    tampered = token("monitor", None, "late") + "x"
    async with httpx.AsyncClient(base_url=lone_gateway.url(), timeout=60) as anyone:
        for header in ("", "Bearer", "Basic dXNlcjpwdw==", f"Bearer {tampered}",
                       "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4Iiwicm9sZSI6ImFkbWluIn0."):
            r = await anyone.get("/v1/safety/status", headers={"Authorization": header})
            assert r.status_code == 401, (header, r.text)
            assert r.json()["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        # Two tokens: the gateway would check one and forward the other.
        monitor, site = token("monitor", None), token("pharmacist", "S1")
        r = await anyone.get("/v1/safety/status", headers=[
            ("Authorization", f"Bearer {monitor}"), ("Authorization", f"Bearer {site}")])
        assert (r.status_code, r.json()["code"]) == (401, "unauthorized"), r.text
        assert "more than one" in r.json()["detail"]


async def test_one_merged_openapi_document_and_the_asyncapi_document(lone_gateway: System) -> None:
    async with httpx.AsyncClient(base_url=lone_gateway.url(), timeout=60) as anyone:
        openapi = (await anyone.get("/openapi.json")).json()
        asyncapi = (await anyone.get("/asyncapi.json")).json()
        docs = await anyone.get("/docs")
    paths = openapi["paths"]
    for path, method in (("/v1/screenings", "post"), ("/v1/patients/{patient_id}", "get"),
                         ("/v1/patients/{patient_id}/schedule", "get"),
                         ("/v1/safety/status", "get"), ("/v1/audit/events", "get"),
                         ("/v1/audit/export", "get"), ("/healthz", "get")):
        assert method in paths.get(path, {}), path
    assert not any(p.startswith("/internal") for p in paths)
    assert openapi["paths"]["/v1/screenings"]["post"]["security"] == [{"bearer": []}]
    assert "ScreeningRequest" in openapi["components"]["schemas"]
    assert asyncapi["asyncapi"].startswith("3.")
    assert "AccessDenied" in str(asyncapi)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
