"""The gateway in process, in front of a stand-in service: a small aiohttp server on loopback,
so the gateway's own client makes real HTTP calls."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from aiohttp import web
from aiohttp.test_utils import RawTestServer

from deploy import infra
from services.gateway.app import create_gateway
from shared.settings import Settings

SECRET = "unit-test-jwt-secret-that-is-long-enough-0123456789"

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def gateway_with(upstream: Handler | None,
                       **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway in process, its randomization service `upstream` (None: nothing listens)."""
    server = RawTestServer(upstream) if upstream is not None else None
    if server is not None:  # access_log=None: the stand-in's own lines are not the gateway's
        await server.start_server(access_log=None)
    url = str(server.make_url("")) if server else f"http://127.0.0.1:{infra.free_port()}"
    app = create_gateway(Settings(service_name="gateway", jwt_secret=SECRET, log_format="json",
                                  randomization_url=url, **settings))
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            yield client
    finally:
        if server is not None:
            await server.close()


