"""`Server-Timing` (D90) on the running system: a write's answer through the gateway names the
service's parts and the gateway's own, so one slow answer shows where its time went."""

from __future__ import annotations

import httpx

from shared.timing import entries
from tests.e2e.conftest import screening, token
from tooling.launcher import System


async def test_a_write_through_the_gateway_names_every_part(system: System) -> None:
    auth = {"Authorization": f"Bearer {token('site_coordinator', 'S1')}"}
    async with httpx.AsyncClient(base_url=system.url("gateway"), timeout=60,
                                 headers=auth) as site:
        r = await site.post("/v1/screenings", json=screening("S1"))
    assert r.status_code == 201, r.text
    parts = entries(r.headers["server-timing"])
    assert set(parts) == {"commit", "publish", "app", "upstream", "gateway"}, parts
    # each figure rounded to 0.1 ms: the service's whole within the round trip to it, that
    # within the gateway's whole
    assert parts["commit"] + parts["publish"] <= parts["app"] + 0.2
    assert parts["app"] <= parts["upstream"] + 0.2
    assert parts["upstream"] <= parts["gateway"] + 0.2

    async with httpx.AsyncClient(base_url=system.url("randomization"), timeout=60,
                                 headers=auth) as direct:
        r = await direct.post("/v1/screenings", json=screening("S1"))
    assert r.status_code == 201, r.text
    assert set(entries(r.headers["server-timing"])) == {"commit", "publish", "app"}
