"""The gateway: the one public HTTP entry. Token, rate limit, permission, then the owning service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Receive, Scope, Send
from yarl import URL

from services.gateway.docs import asyncapi, merged_openapi
from services.gateway.ratelimit import RateLimiter, retry_after
from services.gateway.routes import ROUTES, Route, match_route, route_for
from shared.auth import JWTVerifier, Principal, authorization_header
from shared.heap import settle
from shared.logs import RequestLogMiddleware, configure_logging
from shared.metrics import Metrics, MetricsMiddleware, metrics_endpoint, route_template
from shared.permissions import allowed
from shared.settings import Settings, check_production
from shared.timing import ServerTimingMiddleware, timed
from shared.tracing import client_span, configure_tracing, instrument_app
from shared.web import (
    BodyLimitMiddleware,
    Problem,
    RequestIdMiddleware,
    current_request_id,
    health_router,
    install_problem_handlers,
    problem_response,
)

__all__ = ["ROUTES", "app", "create_gateway", "route_for"]
log = logging.getLogger(__name__)
FORWARDED_HEADERS = ("authorization", "content-type", "accept", "idempotency-key")
WHOLE_BODY_BYTES = 256 * 1024  # answers up to this size are read whole, not streamed
RETURNED_HEADERS = ("content-type", "retry-after", "location", "idempotent-replayed",
                    "content-disposition", "cache-control", "x-ledger-position",
                    "server-timing")
# Below uvicorn's 5 s: the gateway drops an idle connection before the service would close it
# under a request just sent on it.
IDLE_CONNECTION_S = 4.0


def create_gateway(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings(service_name="gateway")
    check_production(settings)
    configure_logging(settings)
    configure_tracing("gateway")  # off unless the OTEL_* variables ask for an exporter
    verifier = JWTVerifier(settings)
    upstreams = settings.service_urls()
    limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # aiohttp, not httpx: a forwarded request costs its client a sixteenth of the CPU (D69).
        # A wait of upstream_timeout_s for a connection and for each read, never for the whole
        # answer: an audit export streams for as long as it has rows.
        wait = settings.upstream_timeout_s
        timeout = aiohttp.ClientTimeout(total=None, connect=wait, sock_read=wait)
        connector = aiohttp.TCPConnector(limit=200, keepalive_timeout=IDLE_CONNECTION_S)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as client:
            app.state.client = client
            settle(settings)  # the collector, once the app and its client are built (D65)
            yield

    async def ready(request: Request) -> dict[str, bool]:
        # The gateway holds no state: it is ready when it runs. A service that is down is
        # answered per request with a clear 503, not by taking the whole API out of rotation.
        return {}

    async def services(request: Request) -> dict[str, Any]:
        """Every service's own /readyz, side by side: what an operator looks at first."""
        client: aiohttp.ClientSession = request.app.state.client

        async def one(name: str, url: str) -> tuple[str, dict[str, Any]]:
            try:
                # Short: a caller's own readiness probe must not wait on a hung service.
                async with client.get(f"{url}/readyz",
                                      timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                    body = await r.json(content_type=None)
                return name, {"ready": r.status == 200, "checks": body.get("checks", {})}
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                return name, {"ready": False, "error": type(exc).__name__}

        found = await asyncio.gather(*(one(n, u) for n, u in sorted(upstreams.items())))
        return {"services": dict(found)}

    # /docs and /redoc from assets the project serves itself: they work offline (a site's
    # network, an air-gapped deployment), never from a CDN.
    app = FastAPIOffline(title="NCT03424629 trial API", lifespan=lifespan)
    app.add_api_route("/metrics", metrics_endpoint, include_in_schema=False)
    install_problem_handlers(app)
    app.include_router(health_router(ready, services))

    @app.get("/asyncapi.json", include_in_schema=False)
    async def asyncapi_json() -> JSONResponse:
        return JSONResponse(asyncapi())

    documents: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "openapi" not in documents:  # built once, on first use, from the services' routers
            own = FastAPI.openapi(app).get("paths", {})
            documents["openapi"] = merged_openapi(own)
        return documents["openapi"]

    app.openapi = openapi  # type: ignore[method-assign]

    async def refuse(request: Request, route: Route, who: Principal) -> Problem:
        problem = Problem(403, "forbidden",
                          f"Role {who.role} may not {route.action.value.replace('_', ' ')}")
        if request.method == "POST":  # a refused write: the owning service records AccessDenied
            report = {"method": request.method, "path": request.url.path, "status": 403,
                      "code": problem.code}
            try:
                async with request.app.state.client.post(
                        upstreams[route.service] + "/internal/access-denied", json=report,
                        headers={"authorization": request.headers["authorization"],
                                 "x-request-id": current_request_id() or ""}) as answer:
                    await answer.read()
            except (aiohttp.ClientError, TimeoutError) as exc:  # the refusal stands; logged
                log.warning("could not report AccessDenied to %s: %r", route.service, exc)
        return problem

    async def forward(request: Request, route: Route) -> Response:
        who = await verifier.principal_of(authorization_header(request.headers))  # else 401
        request.state.principal = who  # for the request's log line (sub and role only)
        wait = limiter.take(who.sub)
        if wait > 0:
            problem = Problem(429, "rate_limited", "Too many requests",
                              f"At most {settings.rate_limit_per_s:g} requests per second "
                              f"(bursts of {settings.rate_limit_burst}) per caller")
            return problem_response(problem, {"Retry-After": retry_after(wait)})
        if not allowed(who, route.action):  # site checks need the record: the service does them
            raise await refuse(request, route, who)
        return await _forward(request, route.service, upstreams[route.service])

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                   include_in_schema=False)
    async def not_public(request: Request) -> Response:
        # A public route is answered by PublicRoutes before the router; only when that
        # middleware is not in front does one come here.
        route = _matched(request.scope)
        if route is None:
            raise Problem(404, "not_found", "No such resource")
        return await forward(request, route)

    # Innermost of the middlewares, so the body limit, request id, metrics and the log line
    # wrap a public route's answer as they wrap every other.
    app.add_middleware(PublicRoutes, forward=forward, handlers=app.exception_handlers)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Its own time and the round trip to the service, beside the service's own entries (D90).
    app.add_middleware(ServerTimingMiddleware, total="gateway")
    app.add_middleware(RequestIdMiddleware)
    # Forwarded requests all match one catch-all route: label them by the public route instead.
    app.state.metrics = Metrics()
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, label=_public_route)
    app.add_middleware(RequestLogMiddleware, service="gateway", route=_public_route)
    instrument_app(app, "gateway")
    return app


Forward = Callable[[Request, Route], Awaitable[Response]]
_ROUTE = "trial.public_route"  # the scope's key for the request's public route, once matched


def _matched(scope: Scope) -> Route | None:
    """The request's public route, matched once and kept in its scope for the middlewares."""
    if _ROUTE not in scope:
        scope[_ROUTE] = match_route(scope["method"], scope["path"])
    route: Route | None = scope[_ROUTE]
    return route


class PublicRoutes:
    """A request for a public route goes straight to the gateway's `forward`, past FastAPI's
    router, its exception middleware and its endpoint machinery: about a quarter of what the
    gateway spent on a forwarded read (D77). Its exceptions are answered by the app's own
    handlers (a Problem, a bad token), exactly as the router's would be; any other goes on to
    RequestIdMiddleware's 500. Anything else (no public route, another method) goes to the
    router as before."""

    def __init__(self, app: ASGIApp, forward: Forward,
                 handlers: dict[Any, Callable[..., Any]]) -> None:
        self.app, self.forward, self.handlers = app, forward, handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = _matched(scope) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await self.forward(request, route)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Callable[..., Any] | None:
        for kind in type(exc).__mro__:
            if kind is Exception:  # what is left is a 500, answered further out
                return None
            if kind in self.handlers:
                return self.handlers[kind]
        return None


def _public_route(scope: Scope) -> str:
    route = _matched(scope)
    return route.template if route is not None else route_template(scope)


def _upstream_url(request: Request, base_url: str) -> URL:
    """The caller's path and query string exactly as sent (still percent-encoded), under the
    service's base URL. Decoding and re-encoding would break on odd bytes in an id, and a parsed
    query would fold `?a=1&a=2` into one value, hiding from the service what it must refuse."""
    path: bytes = request.scope.get("raw_path") or request.url.path.encode()
    query: bytes = request.scope.get("query_string") or b""
    target = path + (b"?" + query if query else b"")
    if any(byte <= 0x20 or byte >= 0x7F for byte in target):  # what a request line cannot carry
        raise Problem(400, "invalid_url", "The request URL cannot be forwarded",
                      "The path or query holds a byte that is not printable ASCII")
    return URL(base_url.rstrip("/") + target.decode("ascii"), encoded=True)


async def _forward(request: Request, service: str, base_url: str) -> Response:
    headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
    headers["x-request-id"] = current_request_id() or ""
    client: aiohttp.ClientSession = request.app.state.client
    url = _upstream_url(request, base_url)
    body = await request.body()
    asked = time.perf_counter()
    with client_span(request.method, str(url), headers) as span:
        try:
            upstream = await client.request(request.method, url, data=body or None,
                                            headers=headers, allow_redirects=False)
        except TimeoutError as exc:  # aiohttp's own timeouts are TimeoutErrors too
            raise Problem(504, "upstream_timeout",
                          f"The {service} service did not answer in time") from exc
        except aiohttp.ClientConnectorError as exc:  # restarting, most likely: the caller retries
            unavailable = Problem(503, "service_unavailable",
                                  f"The {service} service is unavailable")
            unavailable.headers = {"Retry-After": "1"}
            raise unavailable from exc
        except aiohttp.ClientError as exc:
            raise Problem(502, "bad_gateway", f"The {service} service failed") from exc
        span.answered(upstream.status)
    passed = {k: v for k, v in upstream.headers.items() if k.lower() in RETURNED_HEADERS}
    length = upstream.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) <= WHOLE_BODY_BYTES:
        # A small answer of known length (nearly all of them) is passed on whole: a plain
        # response costs the gateway far less than a streamed one.
        try:
            answer = await upstream.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Problem(502, "bad_gateway", f"The {service} service failed") from exc
        finally:
            upstream.release()
        timed("upstream", time.perf_counter() - asked)  # Server-Timing (D90)
        return Response(answer, status_code=upstream.status, headers=passed)
    timed("upstream", time.perf_counter() - asked)  # to the answer's start: the body streams
    # Passed on as it arrives: an audit export is never held whole in the gateway's memory.
    return StreamingResponse(_relay_body(upstream, service), status_code=upstream.status,
                             headers=passed, background=BackgroundTask(upstream.release))


async def _relay_body(upstream: aiohttp.ClientResponse, service: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
    except (aiohttp.ClientError, TimeoutError) as exc:  # the status line is out: cut it short
        log.warning("%s's answer broke off: %r", service, exc)


app = create_gateway()
