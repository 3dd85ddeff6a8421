"""Strict input on the wire (D23): unknown or repeated query parameters, ISO 8601 times only, and
the gateway's upstream URL carrying the caller's raw path and query."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI, Query
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from services.gateway.app import _upstream_url
from shared.web import (
    PROBLEM_JSON,
    IsoAwareDateTime,
    IsoDate,
    IsoDateTime,
    Problem,
    install_problem_handlers,
    strict_input,
)


def filters(patient_id: str | None = None, since: IsoDateTime | None = None) -> dict[str, object]:
    return {"patient_id": patient_id, "since": since.isoformat() if since else None}


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI(dependencies=[Depends(strict_input)])
    install_problem_handlers(app)

    @app.get("/events")
    async def events(chosen: Annotated[dict[str, object], Depends(filters)],
                     limit: int = 100) -> dict[str, object]:
        return {**chosen, "limit": limit}

    @app.get("/tags")
    async def tags(tag: Annotated[list[str] | None, Query()] = None) -> list[str]:
        return tag or []

    return TestClient(app)


def test_declared_parameters_of_the_route_and_of_its_dependencies_pass(client: TestClient) -> None:
    r = client.get("/events", params={"patient_id": "PT-1", "since": "2026-01-01T00:00:00Z",
                                      "limit": 5})
    assert r.status_code == 200, r.text
    assert r.json() == {"patient_id": "PT-1", "since": "2026-01-01T00:00:00+00:00", "limit": 5}


@pytest.mark.parametrize("query, field, kind", [
    ("patinet_id=PT-1", "query.patinet_id", "extra_forbidden"),
    ("patient_id=PT-1&patient_id=PT-2", "query.patient_id", "repeated_parameter"),
    ("limit=1&limit=1000", "query.limit", "repeated_parameter"),
])
def test_unknown_and_repeated_parameters_are_refused(client: TestClient, query: str, field: str,
                                                     kind: str) -> None:
    r = client.get(f"/events?{query}")
    assert r.status_code == 422
    assert r.headers["content-type"].startswith(PROBLEM_JSON)
    assert r.json()["errors"] == [{"field": field, "message": r.json()["errors"][0]["message"],
                                   "type": kind}]


def test_a_list_parameter_may_repeat(client: TestClient) -> None:
    assert client.get("/tags?tag=a&tag=b").json() == ["a", "b"]


@pytest.mark.parametrize("since", ["2026", "1764100000", "-2.77e-151", "yesterday", "26-01-01"])
def test_a_time_that_is_not_iso_8601_text_is_refused(client: TestClient, since: str) -> None:
    r = client.get("/events", params={"since": since})
    assert r.status_code == 422, r.text
    assert "ISO 8601" in r.json()["errors"][0]["message"]


class Body(BaseModel):
    day: IsoDate
    at: IsoAwareDateTime


def test_json_numbers_are_not_dates_or_times() -> None:
    ok = Body.model_validate_json('{"day": "2026-11-26", "at": "2026-11-26T10:00:00+01:00"}')
    assert ok.day == date(2026, 11, 26) and ok.at.utcoffset() is not None
    for bad in ('{"day": 0, "at": "2026-11-26T10:00:00Z"}',
                '{"day": "2026-11-26", "at": 1764150000}',
                '{"day": "2026-11-26", "at": "2026-11-26T10:00:00"}'):  # no time zone
        with pytest.raises(ValidationError):
            Body.model_validate_json(bad)
    # Python callers may still pass the objects themselves.
    assert Body(day=date(2026, 1, 1), at=datetime.fromisoformat("2026-01-01T00:00:00+00:00"))


@pytest.fixture(scope="module")
def posting() -> TestClient:
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/body")
    async def body(sent: Body) -> dict[str, str]:
        return {"day": sent.day.isoformat(), "at": sent.at.isoformat()}

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("day, at", [
    ("2026-11-26", "0001-01-01T00:00:00+05:00"),  # before year 1 in UTC: astimezone overflowed
    ("2026-11-26", "9999-12-31T23:00:00-05:00"),  # after 9999 in UTC
    ("2026-11-26", "0001-01-01T00:00:00Z"),
    ("9999-12-31", "2026-11-26T10:00:00Z"),  # a week later does not exist
    ("0001-01-01", "2026-11-26T10:00:00Z"),
])
def test_a_date_or_time_at_the_calendar_s_ends_is_a_422_not_a_500(
        posting: TestClient, day: str, at: str) -> None:
    r = posting.post("/body", json={"day": day, "at": at})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith(PROBLEM_JSON)
    assert "must be between 0002-01-01 and 9998-12-31" in r.json()["errors"][0]["message"]


def test_the_calendar_s_usable_ends_are_taken() -> None:
    sent = Body.model_validate_json('{"day": "9998-12-31", "at": "0002-01-01T00:00:00+14:00"}')
    assert sent.day == date(9998, 12, 31) and sent.at == datetime(1, 12, 31, 10, tzinfo=UTC)


class Note(BaseModel):
    text: str


@pytest.fixture(scope="module")
def lookups() -> TestClient:
    app = FastAPI(dependencies=[Depends(strict_input)])
    install_problem_handlers(app)

    @app.get("/patients/{patient_id}")
    async def patient(patient_id: str, since: str | None = None) -> dict[str, str]:
        return {"patient_id": patient_id}

    @app.post("/patients/{patient_id}/notes")
    async def note(patient_id: str, sent: Note) -> dict[str, str]:
        return {"text": sent.text}

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("method, url, body, field", [
    ("GET", "/patients/%00", None, "path.patient_id"),
    ("GET", "/patients/PT-1%00", None, "path.patient_id"),
    ("GET", "/patients/PT-1?since=a%00b", None, "query.since"),
    ("POST", "/patients/PT-1/notes", b'{"text": "a\\u0000b"}', "body"),
    ("POST", "/patients/PT-1/notes", b'{"text": "\\\\\\u0000"}', "body"),
])
def test_a_nul_character_anywhere_is_a_422_naming_where(
        lookups: TestClient, method: str, url: str, body: bytes | None, field: str) -> None:
    """PostgreSQL's text cannot hold NUL: a lookup by such an id failed as a 500 there."""
    r = lookups.request(method, url, content=body,
                        headers={"content-type": "application/json"} if body else {})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith(PROBLEM_JSON)
    assert [(e["field"], e["type"]) for e in r.json()["errors"]] == [(field, "string_nul")]


def test_a_backslash_followed_by_u0000_is_text_not_a_nul(lookups: TestClient) -> None:
    r = lookups.post("/patients/PT-1/notes", content=b'{"text": "C:\\\\u0000"}',
                     headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json() == {"text": "C:\\u0000"}


def _request(raw_path: bytes, query: bytes) -> Request:
    return Request({"type": "http", "method": "GET", "path": raw_path.decode("latin-1"),
                    "raw_path": raw_path, "query_string": query, "headers": []})


def test_the_gateway_forwards_path_and_query_byte_for_byte() -> None:
    url = _upstream_url(_request(b"/v1/patients/x%17y/schedule", b"a=1&a=%5B%5D"),
                        "http://127.0.0.1:8002")
    assert str(url) == "http://127.0.0.1:8002/v1/patients/x%17y/schedule?a=1&a=%5B%5D"
    assert str(_upstream_url(_request(b"/v1/safety/status", b""), "http://svc/prefix/")) \
        == "http://svc/prefix/v1/safety/status"


@pytest.mark.parametrize(("raw_path", "query"), [
    (b"/v1/patients/x\x7fy", b""), (b"/v1/patients/x\xc3\xa9", b""), (b"/v1/patients/x y", b""),
    (b"/v1/patients/x", b"a=\x00"), (b"/v1/patients/x", b"a=\r\nX-Injected: 1")])
def test_the_gateway_refuses_a_byte_a_request_line_cannot_carry(raw_path: bytes,
                                                                 query: bytes) -> None:
    with pytest.raises(Problem) as refused:
        _upstream_url(_request(raw_path, query), "http://127.0.0.1:8002")
    assert (refused.value.status, refused.value.code) == (400, "invalid_url")
