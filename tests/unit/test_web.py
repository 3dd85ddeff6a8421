"""The shared HTTP conventions, in process: problem+json for every error, and the request id."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Message, Receive, Scope, Send

from shared.web import (
    PROBLEM_JSON,
    Problem,
    RequestIdMiddleware,
    current_request_id,
    install_problem_handlers,
)

STACK_MARKERS = ("Traceback", "RuntimeError", "the database password is hunter2", 'File "', "line ")


class Dose(BaseModel):
    model_config = ConfigDict(extra="forbid")
    week: int = Field(ge=0, le=52)
    dose_mg: float = Field(ge=5, le=25)


def make_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(RequestIdMiddleware)
    install_problem_handlers(app)

    @app.get("/held")
    async def held() -> None:
        raise Problem(409, "dosing_held", "Dosing is held", detail="rule R-ARM holds msc_high",
                      rule_id="R-ARM")

    @app.get("/login")
    async def login() -> None:
        raise Problem(401, "unauthorized", "Missing bearer token")

    @app.post("/doses")
    async def doses(body: Dose) -> dict[str, Any]:
        return body.model_dump()

    @app.get("/teapot")
    async def teapot() -> None:
        raise HTTPException(status_code=418, detail="I'm a teapot")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("the database password is hunter2")

    @app.get("/whoami")
    async def whoami() -> dict[str, str | None]:
        return {"request_id": current_request_id()}

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(make_app(), raise_server_exceptions=False)


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].endswith(f"/problems/{code}")
    assert body["type"].startswith("https://")
    assert isinstance(body["title"], str) and body["title"]
    return body


def test_problem_becomes_problem_json(client: TestClient) -> None:
    body = assert_problem(client.get("/held"), 409, "dosing_held")
    assert body["title"] == "Dosing is held"
    assert body["detail"] == "rule R-ARM holds msc_high"
    assert body["rule_id"] == "R-ARM"


def test_401_problem_asks_for_a_bearer_token(client: TestClient) -> None:
    response = client.get("/login")
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert "www-authenticate" not in client.get("/held").headers


def test_problem_body_without_detail_omits_it() -> None:
    body = Problem(404, "not_found", "No such patient").body()
    assert body == {"type": "https://nct03424629.example/problems/not_found", "title": "No such patient",
                    "status": 404, "code": "not_found"}


def test_valid_body_passes(client: TestClient) -> None:
    response = client.post("/doses", json={"week": 3, "dose_mg": 10.0})
    assert response.status_code == 200
    assert response.json() == {"week": 3, "dose_mg": 10.0}


def test_body_validation_failure_is_422_with_field_errors(client: TestClient) -> None:
    response = client.post("/doses", json={"week": 3, "dose_mg": 40.0, "note": "x"})
    body = assert_problem(response, 422, "validation_error")
    errors = body["errors"]
    assert isinstance(errors, list)
    assert {e["field"] for e in errors} == {"body.dose_mg", "body.note"}
    for error in errors:
        assert set(error) == {"field", "message", "type"}
        assert error["message"]


def test_missing_field_is_named(client: TestClient) -> None:
    body = assert_problem(client.post("/doses", json={"dose_mg": 10.0}), 422, "validation_error")
    assert body["errors"] == [{"field": "body.week", "message": "Field required", "type": "missing"}]


@pytest.mark.parametrize("raw", [b"{not json", b'{"week": 3,', b"[1, 2"])
def test_malformed_json_is_400(client: TestClient, raw: bytes) -> None:
    response = client.post("/doses", content=raw, headers={"content-type": "application/json"})
    body = assert_problem(response, 400, "malformed_json")
    assert body["errors"]


def test_undecodable_json_body_is_400_malformed_json(client: TestClient) -> None:
    # Bytes that are not UTF-8 are no more JSON than "{not json": same status, same stable code.
    response = client.post("/doses", content=b'{"week": "\xff"}',
                           headers={"content-type": "application/json"})
    assert_problem(response, 400, "malformed_json")


def test_unknown_route_is_a_404_problem(client: TestClient) -> None:
    assert_problem(client.get("/v1/nowhere"), 404, "not_found")


def test_wrong_method_is_a_405_problem(client: TestClient) -> None:
    assert_problem(client.delete("/held"), 405, "method_not_allowed")


def test_unmapped_http_status_keeps_its_status(client: TestClient) -> None:
    body = assert_problem(client.get("/teapot"), 418, "error")
    assert body["title"] == "I'm a teapot"


def test_unexpected_exception_is_a_500_problem_without_a_stack(client: TestClient) -> None:
    response = client.get("/boom")
    assert_problem(response, 500, "internal_error")
    for marker in STACK_MARKERS:
        assert marker not in response.text


def test_unexpected_exception_still_carries_the_request_id(client: TestClient) -> None:
    # The contract: every response carries X-Request-ID, and the 500 body names it for support.
    response = client.get("/boom", headers={"X-Request-ID": "req-500"})
    assert response.status_code == 500
    assert response.headers.get("x-request-id") == "req-500"
    assert response.json()["request_id"] == "req-500"


# --- X-Request-ID ---------------------------------------------------------------------------------


def assert_fresh_uuid(value: str) -> None:
    assert str(uuid.UUID(value)) == value


@pytest.mark.parametrize("given", ["abc-123", "req.1:2_3", "A" * 128, str(uuid.uuid4())])
def test_well_formed_request_id_is_echoed_and_visible_to_handlers(client: TestClient, given: str) -> None:
    response = client.get("/whoami", headers={"X-Request-ID": given})
    assert response.headers["x-request-id"] == given
    assert response.json() == {"request_id": given}


def test_request_id_is_echoed_on_problems_too(client: TestClient) -> None:
    assert client.get("/v1/nowhere", headers={"X-Request-ID": "req-404"}).headers["x-request-id"] == "req-404"
    assert client.get("/held", headers={"X-Request-ID": "req-409"}).headers["x-request-id"] == "req-409"


def test_absent_request_id_gets_a_fresh_uuid(client: TestClient) -> None:
    first = client.get("/whoami")
    second = client.get("/whoami")
    assert_fresh_uuid(first.headers["x-request-id"])
    assert first.json() == {"request_id": first.headers["x-request-id"]}
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


@pytest.mark.parametrize("given", ["has spaces in it", "A" * 129, "x" * 500, "", "id;drop", "<script>",
                                   "ünïcode"])
def test_malformed_request_id_is_replaced(client: TestClient, given: str) -> None:
    response = client.get("/whoami", headers={"X-Request-ID": given.encode("utf-8")})
    echoed = response.headers["x-request-id"]
    assert echoed != given
    assert_fresh_uuid(echoed)
    assert response.json() == {"request_id": echoed}


def test_request_id_does_not_leak_out_of_the_request(client: TestClient) -> None:
    client.get("/whoami", headers={"X-Request-ID": "req-leak"})
    assert current_request_id() is None


async def call_middleware(request_id: bytes) -> list[Message]:
    """Drive the middleware as a server would, with a raw header value no HTTP client would send."""
    sent: list[Message] = []
    seen: list[str | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(current_request_id())
        await send({"type": "http.response.start", "status": 204,
                    "headers": [(b"x-request-id", b"from-the-app")]})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"x-request-id", request_id)]}
    await RequestIdMiddleware(app)(scope, receive, send)
    headers = [v for k, v in sent[0]["headers"] if k == b"x-request-id"]
    assert len(headers) == 1, "exactly one X-Request-ID, the middleware's"
    assert headers[0].decode() == seen[0]
    return sent


async def test_middleware_replaces_the_apps_own_request_id_header() -> None:
    sent = await call_middleware(b"req-raw")
    assert dict(sent[0]["headers"])[b"x-request-id"] == b"req-raw"


@pytest.mark.parametrize("raw", [b"req-1\n", b"req-1\r\nSet-Cookie: x=1", b"req-1\r"])
async def test_middleware_rejects_line_breaks_in_the_request_id(raw: bytes) -> None:
    # `$` in the pattern also matches before a final newline: the id must be checked whole.
    sent = await call_middleware(raw)
    echoed = dict(sent[0]["headers"])[b"x-request-id"].decode()
    assert_fresh_uuid(echoed)
