"""The gateway: the one public HTTP entry. Checks the token, then forwards to the owning service."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response

from shared.auth import AuthError, JWTVerifier
from shared.service import health_router
from shared.settings import Settings
from shared.web import (
    Problem,
    RequestIdMiddleware,
    current_request_id,
    install_problem_handlers,
)

# (methods, path pattern, owning service): the public contract's routes, nothing else.
ROUTES: list[tuple[frozenset[str], re.Pattern[str], str]] = [
    (frozenset({"POST"}), re.compile(r"^/v1/screenings$"), "randomization"),
    (frozenset({"POST"}), re.compile(r"^/v1/patients$"), "randomization"),
    (frozenset({"GET"}), re.compile(r"^/v1/patients/[^/]+$"), "randomization"),
    (frozenset({"POST"}), re.compile(r"^/v1/patients/[^/]+/(randomization|withdrawal|crossover)$"),
     "randomization"),
    (frozenset({"GET"}), re.compile(r"^/v1/patients/[^/]+/schedule$"), "dosing"),
    (frozenset({"POST"}), re.compile(r"^/v1/patients/[^/]+/(infusions|methotrexate-doses)$"),
     "dosing"),
    (frozenset({"POST"}), re.compile(r"^/v1/patients/[^/]+/(adverse-events|lab-results)$"),
     "safety"),
    (frozenset({"GET", "POST"}), re.compile(r"^/v1/safety/[a-z-]+$"), "safety"),
    (frozenset({"GET"}), re.compile(r"^/v1/audit/[a-z-]+$"), "audit"),
]
FORWARDED_HEADERS = ("authorization", "content-type", "accept", "idempotency-key")


def route_for(method: str, path: str) -> str | None:
    for methods, pattern, service in ROUTES:
        if method in methods and pattern.match(path):
            return service
    return None


def create_gateway(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings(service_name="gateway")
    verifier = JWTVerifier(settings)
    upstreams = settings.service_urls()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        async with httpx.AsyncClient(timeout=settings.upstream_timeout_s, limits=limits) as client:
            app.state.client = client
            yield

    async def ready(request: Request) -> dict[str, bool]:
        # The gateway holds no state: it is ready when it runs. A service that is down is
        # answered per request with a clear 503, not by taking the whole API out of rotation.
        return {}

    app = FastAPI(title="NCT03424629 trial API", lifespan=lifespan)
    app.add_middleware(RequestIdMiddleware)
    install_problem_handlers(app)
    app.include_router(health_router(ready))

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                   include_in_schema=False)
    async def forward(request: Request) -> Response:
        service = route_for(request.method, request.url.path)
        if service is None:
            raise Problem(404, "not_found", "No such resource")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Problem(401, "unauthorized", "A bearer token is required")
        try:
            verifier.verify(token.strip())
        except AuthError as exc:
            raise Problem(401, "unauthorized", "The bearer token is not valid", str(exc)) from exc
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        headers["x-request-id"] = current_request_id() or ""
        client: httpx.AsyncClient = request.app.state.client
        try:
            upstream = await client.request(
                request.method, upstreams[service] + request.url.path,
                params=request.query_params, content=await request.body(), headers=headers)
        except httpx.TimeoutException as exc:
            raise Problem(504, "upstream_timeout", f"The {service} service did not answer in time"
                          ) from exc
        except httpx.ConnectError as exc:
            raise Problem(503, "service_unavailable", f"The {service} service is unavailable"
                          ) from exc
        except httpx.HTTPError as exc:
            raise Problem(502, "bad_gateway", f"The {service} service failed") from exc
        passed = {k: v for k, v in upstream.headers.items()
                  if k.lower() in ("content-type", "retry-after", "location")}
        return Response(upstream.content, status_code=upstream.status_code, headers=passed)

    return app


app = create_gateway()
