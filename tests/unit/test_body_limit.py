"""The request body limit, in process: 413 problem+json before any handler sees the body."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from pydantic import BaseModel

from shared.web import PROBLEM_JSON, BodyLimitMiddleware, RequestIdMiddleware, install_problem_handlers

LIMIT = 4096
JSON = {"Content-Type": "application/json"}


class Note(BaseModel):
    text: str


def make_app() -> tuple[FastAPI, list[str]]:
    handled: list[str] = []
    app = FastAPI()
    app.add_middleware(BodyLimitMiddleware, max_bytes=LIMIT)
    app.add_middleware(RequestIdMiddleware)
    install_problem_handlers(app)

    @app.post("/notes", status_code=201)
    async def post(note: Note) -> dict[str, int]:
        handled.append(note.text)
        return {"length": len(note.text)}

    return app, handled


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def _body(size: int) -> bytes:
    return b'{"text": "' + b"x" * (size - 12) + b'"}'


async def _chunks(body: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i:i + size]


async def test_a_body_within_the_limit_is_handled() -> None:
    app, handled = make_app()
    async with _client(app) as c:
        r = await c.post("/notes", content=_body(LIMIT), headers=JSON)
        assert r.status_code == 201, r.text
        r = await c.post("/notes", content=_chunks(_body(LIMIT)), headers=JSON)  # no length
        assert r.status_code == 201, r.text
    assert len(handled) == 2


async def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    app, handled = make_app()
    async with _client(app) as c:
        r = await c.post("/notes", content=_body(LIMIT + 1), headers=JSON)
    assert r.status_code == 413
    assert r.headers["content-type"].startswith(PROBLEM_JSON)
    assert r.json()["code"] == "payload_too_large" and r.headers["x-request-id"]
    assert handled == []


async def test_a_chunked_body_is_cut_off_at_the_limit() -> None:
    app, handled = make_app()
    async with _client(app) as c:
        r = await c.post("/notes", content=_chunks(_body(LIMIT * 50)), headers=JSON)
    assert "content-length" not in r.request.headers  # counted as it arrived
    assert r.status_code == 413
    assert r.json()["code"] == "payload_too_large" and r.headers["x-request-id"]
    assert handled == []
