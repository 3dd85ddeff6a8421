"""How the gateway passes a request on and the answer back (services/gateway/app.py), against a
stand-in service on loopback: byte for byte, never following a redirect, streaming a large
answer, a clear 502 when the service's answer breaks off, and a public route answered before
FastAPI's router with the same problems the router's handlers give."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from starlette.routing import Router

from shared.auth import issue_dev_token
from tests.unit.gateway_upstream import SECRET, gateway_with

COORDINATOR = {"Authorization": f"Bearer {issue_dev_token(SECRET, 'site_coordinator', 'S1')}"}


async def test_the_path_query_headers_and_body_reach_the_service_as_sent() -> None:
    seen: list[web.BaseRequest] = []
    bodies: list[bytes] = []

    async def answer(request: web.BaseRequest) -> web.Response:
        seen.append(request)
        bodies.append(await request.read())
        return web.json_response({"ok": True}, status=201, headers={"Location": "/v1/x",
                                                                    "X-Internal": "no"})

    async with gateway_with(answer) as gateway:
        r = await gateway.get("/v1/patients/PT-%C3%A9%25x?a=1&a=2&b=%20",
                              headers={**COORDINATOR, "X-Request-ID": "fwd-1", "Cookie": "c=1"})
        assert r.status_code == 201, r.text
        posted = await gateway.post("/v1/patients", content=b'{"screening_id": "s-1"}',
                                    headers={**COORDINATOR, "Content-Type": "application/json",
                                             "Idempotency-Key": "k-1"})
        assert posted.status_code == 201, posted.text
    get, post = seen
    assert get.raw_path == "/v1/patients/PT-%C3%A9%25x?a=1&a=2&b=%20"  # not decoded, not folded
    assert get.headers["x-request-id"] == "fwd-1"
    assert get.headers["authorization"] == COORDINATOR["Authorization"]
    assert "cookie" not in get.headers  # only the headers a service reads are passed on
    assert bodies == [b"", b'{"screening_id": "s-1"}']
    assert (post.method, post.headers["idempotency-key"]) == ("POST", "k-1")
    assert r.headers["location"] == "/v1/x" and "x-internal" not in r.headers


async def test_a_redirect_is_passed_back_to_the_caller_not_followed() -> None:
    calls: list[str] = []

    async def answer(request: web.BaseRequest) -> web.Response:
        calls.append(request.path)
        return web.Response(status=303, headers={"Location": "/v1/patients/PT-2"})

    async with gateway_with(answer) as gateway:
        r = await gateway.get("/v1/patients/PT-1", headers=COORDINATOR)
    assert (r.status_code, r.headers["location"]) == (303, "/v1/patients/PT-2")
    assert calls == ["/v1/patients/PT-1"]


async def test_a_large_answer_of_unknown_length_is_streamed_through_whole() -> None:
    chunk = bytes(range(256)) * 256  # 64 KiB

    async def answer(request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(16):
            await response.write(chunk)
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    async with gateway_with(answer) as gateway:
        r = await gateway.get("/v1/patients/PT-1", headers=COORDINATOR)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    assert r.content == chunk * 16


async def test_an_answer_that_breaks_off_is_a_502_problem() -> None:
    async def answer(request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"x" * 10)
        assert request.transport is not None
        request.transport.close()  # 10 bytes of the 1000 promised
        return response

    async with gateway_with(answer) as gateway:
        r = await gateway.get("/v1/patients/PT-1", headers=COORDINATOR)
    assert r.status_code == 502, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "bad_gateway" and "randomization" in r.json()["title"]


async def test_a_public_route_is_answered_before_the_router_with_the_same_problems(
        monkeypatch: pytest.MonkeyPatch) -> None:
    routed: list[str] = []
    route = Router.__call__

    async def counted(self: Router, scope: Any, receive: Any, send: Any) -> None:
        routed.append(scope["path"])
        await route(self, scope, receive, send)

    monkeypatch.setattr(Router, "__call__", counted)

    async def answer(request: web.BaseRequest) -> web.Response:
        return web.json_response({"patient_id": "PT-1"})

    async with gateway_with(answer) as gateway:
        served = await gateway.get("/v1/patients/PT-1", headers=COORDINATOR)
        no_token = await gateway.get("/v1/patients/PT-1")
        forbidden = await gateway.get("/v1/audit/events", headers=COORDINATOR)
        unknown = await gateway.get("/v1/no-such-thing", headers=COORDINATOR)
        other_method = await gateway.request("HEAD", "/v1/patients/PT-1", headers=COORDINATOR)
        probe = await gateway.get("/healthz")
    assert (served.status_code, served.json()) == (200, {"patient_id": "PT-1"})
    assert served.headers["x-request-id"]  # the middlewares wrap it as they wrap any answer
    problems = {r.status_code: r for r in (no_token, forbidden, unknown)}
    assert sorted(problems) == [401, 403, 404]
    assert all(r.headers["content-type"] == "application/problem+json"
               for r in problems.values())
    assert no_token.headers["www-authenticate"] == "Bearer"
    assert (forbidden.json()["code"], unknown.json()["code"]) == ("forbidden", "not_found")
    assert (other_method.status_code, probe.status_code) == (405, 200)
    # Only what is not a public route reached the router.
    assert routed == ["/v1/no-such-thing", "/v1/patients/PT-1", "/healthz"]
