"""Wiring every service shares: settings, store, relay, consumers, auth and health in one app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from shared.auth import AuthError, JWTVerifier, Principal
from shared.consumer import ConsumerRunner, Handler
from shared.events import AccessDenied
from shared.idempotency import IdempotencyMiddleware
from shared.kafka import broker_reachable, ensure_topics_forever
from shared.metrics import CountersCollector, Metrics, MetricsMiddleware, metrics_endpoint
from shared.migrate import upgrade
from shared.relay import Relay
from shared.settings import Settings
from shared.store import EventStore, Metadata, NewEvent, utcnow
from shared.web import (
    BodyLimitMiddleware,
    Problem,
    RequestIdMiddleware,
    current_request_id,
    install_problem_handlers,
    problem_response,
    reject_unknown_query,
)

log = logging.getLogger(__name__)


@dataclass
class ServiceSpec:
    """What makes a service itself: its name, routes, and the events it consumes."""

    name: str
    router: APIRouter
    consumes: list[str] = field(default_factory=list)
    handlers: Mapping[str, Handler] = field(default_factory=dict)
    publishes: bool = True


class Runtime:
    """The running parts of one service process; `app.state.runtime` in request handlers."""

    def __init__(self, spec: ServiceSpec, settings: Settings) -> None:
        self.spec = spec
        self.settings = settings
        self.store = EventStore(settings.resolved_database_url())
        self.verifier = JWTVerifier(settings)
        self.relay = Relay(self.store, settings) if spec.publishes else None
        self.consumer = (ConsumerRunner(self.store, settings, spec.consumes, spec.handlers)
                         if spec.consumes else None)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await upgrade(self.settings.resolved_database_url())
        if self.relay is not None and self.settings.relay_enabled:
            self._tasks.append(asyncio.create_task(self.relay.run(self._stop)))
        if self.consumer is not None and self.settings.consumers_enabled:
            self._tasks.append(asyncio.create_task(self._consume()))

    async def _consume(self) -> None:
        assert self.consumer is not None
        await ensure_topics_forever(self.settings, self._stop)
        await self.consumer.run(self._stop)

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, 10)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
            except Exception as exc:
                log.warning("background task ended with %r", exc)
        await self.store.close()

    async def ready(self) -> dict[str, bool]:
        checks = {"database": False, "broker": False}
        with contextlib.suppress(Exception):
            async with self.store.read_engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
                checks["database"] = True
        checks["broker"] = await broker_reachable(self.settings.kafka_bootstrap_servers)
        return checks


def health_router(ready: Callable[[Request], Awaitable[dict[str, bool]]]) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz(request: Request) -> dict[str, object]:
        checks = await ready(request)
        if not all(checks.values()):
            raise Problem(503, "not_ready", "Not ready", checks=checks)
        return {"status": "ready", "checks": checks}

    return router


def create_app(spec: ServiceSpec, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings(service_name=spec.name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(spec, settings)
        app.state.runtime = runtime
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    async def ready(request: Request) -> dict[str, bool]:
        return await request.app.state.runtime.ready()

    app = FastAPI(title=f"NCT03424629 {spec.name} service", lifespan=lifespan,
                  dependencies=[Depends(reject_unknown_query)])
    # Added first, so it runs inside the request id middleware: replays carry the new id.
    app.add_middleware(IdempotencyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    install_metrics(app)
    install_problem_handlers(app)
    install_access_logging(app, spec.name)
    app.include_router(health_router(ready))
    app.include_router(access_router())
    app.include_router(spec.router)
    return app


Loop = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def run_beside(app: FastAPI, start: Callable[[FastAPI], Loop]) -> None:
    """Run a service's own loop (a sweep, an anchorer) for the app's whole life: `start(app)` is
    called once the runtime is up and returns the loop; the loop is stopped before the runtime."""
    service_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service_lifespan(app):
            stop = asyncio.Event()
            task = asyncio.create_task(start(app)(stop))
            try:
                yield
            finally:
                stop.set()
                await task

    app.router.lifespan_context = lifespan


def install_metrics(app: FastAPI) -> None:
    """`GET /metrics` (D28): HTTP answers, the store's head, the relay's lag behind it, and the
    consumer's records by outcome, read from the running Runtime at each scrape."""
    metrics = app.state.metrics = Metrics()
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: sees every final status
    app.add_api_route("/metrics", metrics_endpoint, include_in_schema=False)

    async def refresh() -> None:
        rt: Runtime | None = getattr(app.state, "runtime", None)
        if rt is None:
            return
        head = await rt.store.head()
        metrics.head.set(head)
        if rt.relay is not None:
            metrics.relay_lag.set(head - await rt.store.checkpoint(rt.relay.name))

    def consumed() -> dict[str, int]:
        rt: Runtime | None = getattr(app.state, "runtime", None)
        c = rt.consumer if rt is not None else None
        return {} if c is None else {"seen": c.records_seen, "handled": c.handled,
                                     "duplicate": c.duplicates, "dead_lettered": c.dead_lettered}

    app.state.refresh_metrics = refresh
    metrics.registry.register(CountersCollector(
        consumed, "trial_consumer_records", "Records this service's consumer took from Kafka",
        "outcome"))


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def principal(request: Request) -> Principal:
    """The caller, from its bearer token; every service checks it, not only the gateway."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Problem(401, "unauthorized", "A bearer token is required")
    verifier: JWTVerifier = request.app.state.runtime.verifier
    try:
        who = verifier.verify(token.strip())
    except AuthError as exc:
        raise Problem(401, "unauthorized", "The bearer token is not valid", detail=str(exc)) \
            from exc
    request.state.principal = who  # so a refusal later in the request can name who was refused
    return who


CurrentPrincipal = Annotated[Principal, Depends(principal)]
CurrentRuntime = Annotated[Runtime, Depends(runtime)]


def metadata_for(who: Principal, reason: str | None = None) -> Metadata:
    request_id = current_request_id()
    return Metadata(actor=who.sub, role=who.role, site=who.site, request_id=request_id,
                    correlation_id=request_id, reason=reason)



# --- access logging: refused writes of known principals become AccessDenied events ------------

DENIED_STATUSES = frozenset({403, 404})
_PATIENT_IN_PATH = re.compile(r"^/v1/patients/([^/]+)")


async def record_access_denied(store: EventStore, who: Principal, service: str, method: str,
                               path: str, status: int, code: str) -> None:
    """Append AccessDenied to this service's store: relayed to `trial.access`, kept by audit."""
    found = _PATIENT_IN_PATH.match(path)
    denied = AccessDenied(access_id=str(uuid.uuid4()), service=service, method=method,
                          path=path[:500], status=status, code=code[:100],
                          patient_id=found.group(1)[:200] if found else None,
                          denied_at=utcnow())
    await store.append(f"access-{denied.access_id}", [NewEvent.of(denied, metadata_for(who))], 0)


def install_access_logging(app: FastAPI, service: str) -> None:
    """Every 403 or 404 answered to a POST of a verified principal is recorded (probing shows)."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> Response:
        who = getattr(request.state, "principal", None)
        if request.method == "POST" and exc.status in DENIED_STATUSES and isinstance(who, Principal):
            try:
                await record_access_denied(request.app.state.runtime.store, who, service,
                                           request.method, request.url.path, exc.status, exc.code)
            except Exception as error:  # the refusal stands even if its record fails
                log.warning("could not record AccessDenied: %r", error)
        return problem_response(exc, {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)


class AccessDeniedReport(BaseModel):
    """The gateway's note of a write it refused before forwarding (token of the refused caller)."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field(pattern=r"^[A-Z]{3,7}$")
    path: str = Field(pattern=r"^/v1/", max_length=500)
    status: int = Field(ge=403, le=404)
    code: str = Field(min_length=1, max_length=100)


def access_router() -> APIRouter:
    router = APIRouter(tags=["internal"], include_in_schema=False)

    @router.post("/internal/access-denied", status_code=202)
    async def access_denied(report: AccessDeniedReport, request: Request) -> JSONResponse:
        # The caller's own token: a report can only ever be about the principal who sends it.
        who = principal(request)
        await record_access_denied(runtime(request).store, who, "gateway", report.method,
                                   report.path, report.status, report.code)
        return JSONResponse({"recorded": True}, status_code=202)

    return router
