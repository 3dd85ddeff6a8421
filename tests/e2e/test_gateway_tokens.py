"""Token edge cases against the running system: 401 at the gateway and at every service alike."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import jwt
import pytest

from shared.settings import SERVICES
from tests.e2e.conftest import SECRET
from tooling.launcher import System

# One read route per service, so each service's own verifier answers.
PROBES = {"randomization": "/v1/patients/PT-NONE", "dosing": "/v1/patients/PT-NONE/schedule",
          "safety": "/v1/safety/status", "audit": "/v1/audit/verify",
          "efficacy": "/v1/efficacy/summary"}


def _b64(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "edge", "role": "site_coordinator", "site": "S1", "iat": now, "exp": now + 600}
    return {k: v for k, v in {**base, **overrides}.items() if v is not None}


BAD_TOKENS = {
    "expired": jwt.encode(_claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600),
                          SECRET, algorithm="HS256"),
    "wrong signature": jwt.encode(_claims(), "another-secret-" + "0" * 40, algorithm="HS256"),
    "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims(role='admin', site=None))}.",
    "site role without site": jwt.encode(_claims(site=None), SECRET, algorithm="HS256"),
    "no role": jwt.encode(_claims(role=None), SECRET, algorithm="HS256"),
    "no exp": jwt.encode(_claims(exp=None), SECRET, algorithm="HS256"),
    "unknown role": jwt.encode(_claims(role="superuser"), SECRET, algorithm="HS256"),
    "malformed": "not-a.jwt",
}


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_a_bad_token_is_401_everywhere(system: System, kind: str) -> None:
    headers = {"Authorization": f"Bearer {BAD_TOKENS[kind]}"}
    targets = [("gateway", path) for path in PROBES.values()]
    targets += [(service, PROBES[service]) for service in SERVICES]
    for where, path in targets:
        async with httpx.AsyncClient(base_url=system.url(where), timeout=60) as caller:
            r = await caller.get(path, headers=headers)
            write = await caller.post("/v1/screenings", json={}, headers=headers) \
                if where in ("gateway", "randomization") else r
        for answer in (r, write):
            assert answer.status_code == 401, (kind, where, answer.text)
            assert answer.json()["code"] == "unauthorized"
            assert answer.headers["content-type"] == "application/problem+json"


async def test_a_good_token_passes_the_same_checks(system: System) -> None:
    good = jwt.encode(_claims(role="monitor", site=None), SECRET, algorithm="HS256")
    for service, path in PROBES.items():
        async with httpx.AsyncClient(base_url=system.url(service), timeout=60) as direct:
            r = await direct.get(path, headers={"Authorization": f"Bearer {good}"})
        assert r.status_code != 401, (service, r.text)
