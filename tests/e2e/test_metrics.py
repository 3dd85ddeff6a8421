"""`GET /metrics` on the running system: what an operator scrapes (D28)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import client, screening
from tests.support import eventually
from tooling.launcher import System


async def _scrape(system: System, service: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with httpx.AsyncClient(base_url=system.url(service), timeout=30) as c:
        r = await c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def _count(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return sum(v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls)


async def test_requests_relay_lag_and_consumers_are_scraped(system: System) -> None:
    screenings = {"method": "POST", "route": "/v1/screenings", "status": "201"}
    before = {s: _count(await _scrape(system, s), "trial_http_requests_total", **screenings)
              for s in ("gateway", "randomization")}
    async with client(system) as c:
        r = await c.post("/v1/screenings", json=screening("S1"))
        assert r.status_code == 201, r.text
    for service in ("gateway", "randomization"):  # the gateway labels by the public route
        found = await _scrape(system, service)
        assert _count(found, "trial_http_requests_total", **screenings) == before[service] + 1

    async def relay_caught_up() -> bool:
        found = await _scrape(system, "randomization")
        return _count(found, "trial_store_head_position") >= 1 \
            and _count(found, "trial_relay_lag_events") == 0

    await eventually(relay_caught_up, 60, "the relay to publish the screening")

    async def ledger_took_it() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        found = await _scrape(system, "audit")  # it consumes every topic
        return found if _count(found, "trial_consumer_records_total", outcome="handled") else None

    audit = await eventually(ledger_took_it, 120, "the audit consumer to handle a record")
    assert _count(audit, "trial_consumer_records_total", outcome="seen") >= _count(
        audit, "trial_consumer_records_total", outcome="handled") >= 1
    assert _count(audit, "trial_consumer_records_total", outcome="dead_lettered") == 0
